"""Hint: hindsight hint votes, candidate selection and the teacher's scores → HintJudged.

1. The hint judge casts ``hint_votes`` votes at once (processors.judges: ``llm`` or the
   rule-based ``feedback`` judge whose hint is the user's own correction).
2. Candidates: votes with score +1 and a hint of at least ``hint_min_chars`` characters.
   None → HintJudged with ``rejected_reason`` and no teacher call.
3. Selection (``HintSelection``):
   - ``LONGEST`` — the longest candidate (the baseline).
   - ``OVERLAP_SEQUENCE`` — per candidate k the teacher's top-k ids at each response position
     under the hint-enhanced prompt, against the student's top-k under the original prompt;
     overlap O[k,t] = |S_student,t ∩ S_teacher,k,t|; pick argmax_k Σ_t O[k,t] (ties → longer).
   - ``OVERLAP_TOKEN`` — per position the candidate with the largest O[k,t]; the teacher
     logprob at t comes from that candidate; ``accepted_hint`` is the one chosen most often.
   With a single candidate there is nothing to choose: it is taken and recorded as LONGEST.
4. Teacher (processors.teacher): the chosen hint's logprobs of the exact response tokens and,
   with ``teacher_top_k`` > 0, its K most likely tokens and their logprobs at every position
   (K shrinks for long responses so a record holds at most ``teacher_top_max_entries`` of
   them), which lets the learner match the teacher's distribution, not only score the sample.
   Without a teacher (no engine configured) the hint is recorded with no teacher logprobs
   and assemble counts it as "hint without teacher logprobs".
5. With ``processors.teacher_answers`` the teacher also answers the turn's prompt itself under
   the accepted hint, greedily (processors.teacher: ``answer``); HintJudged carries that answer's
   tokens, and assemble makes a sample of it. An answer that loops is left out.

The overlap math (``overlaps``, ``pick_sequence``, ``pick_tokens``) is pure and import-light.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from processors.dead_letters import validate_transition
from processors.judges import HintJudge, build_hint_judge, raise_if_unreachable
from processors.stage import Context, Handler, Result, Stage
from processors.teacher import Teacher
from schemas.events import HintCandidate, HintJudged, HintSelection, HintVote, TransitionFormed, derived_id


def candidates(votes: list[HintVote], min_chars: int) -> list[HintCandidate]:
    """Accepted candidates, longest first (stable, so equal lengths keep vote order)."""
    found = [HintCandidate(hint=v.hint.strip(), vote_index=v.index)
             for v in votes if v.score == 1 and v.hint and len(v.hint.strip()) >= min_chars]
    return sorted(found, key=lambda c: -len(c.hint))


def overlaps(student_top: list[list[int]], teacher_top: list[list[int]]) -> list[int]:
    """|student top-k ∩ teacher top-k| at each response position."""
    if len(student_top) != len(teacher_top):
        raise ValueError(f"student top-k covers {len(student_top)} positions, teacher {len(teacher_top)}")
    return [len(set(s) & set(t)) for s, t in zip(student_top, teacher_top)]


def pick_sequence(per_candidate: list[list[int]]) -> int:
    """Index of the candidate with the largest total overlap; ties go to the earlier (longer)."""
    totals = [sum(o) for o in per_candidate]
    return max(range(len(totals)), key=lambda k: (totals[k], -k))


def pick_tokens(per_candidate: list[list[int]]) -> list[int]:
    """Per position, the candidate with the largest overlap (ties → earlier)."""
    n = len(per_candidate[0])
    return [max(range(len(per_candidate)), key=lambda k: (per_candidate[k][t], -k)) for t in range(n)]


def top_k_for(n: int, k: int, max_entries: int) -> int:
    """K for a response of `n` tokens: `k`, shrunk so n·K stays within `max_entries` (≥ 1 if k)."""
    return 0 if k <= 0 else max(1, min(k, max_entries // max(n, 1)))


def top_rows(top_ids: list[list[int]] | None, top_lps: list[list[float]] | None,
             k: int) -> tuple[list[int] | None, list[float] | None]:
    """The first `k` of each position's top ids and logprobs, flattened row-major; (None,
    None) when none were asked for. Every row is cut to the shortest (a vocabulary smaller
    than k gives fewer), so K is one number per record."""
    if not k or not top_ids or top_lps is None:
        return None, None
    width = min(k, *(len(r) for r in top_ids), *(len(r) for r in top_lps))
    if width < 1:
        return None, None
    return ([i for r in top_ids for i in r[:width]], [v for r in top_lps for v in r[:width]])


def hints_id(transition: TransitionFormed, judge: HintJudge, selection: HintSelection,
             teacher: Teacher | None) -> str:
    who = teacher.policy.value if teacher else "no-teacher"
    return derived_id("hint", transition.event_id, judge.name, judge.model, judge.version,
                      selection.value, who)


async def judge_hints(transition: TransitionFormed, judge: HintJudge, votes: int, min_chars: int,
                      selection: HintSelection, teacher: Teacher | None, top_k: int,
                      teacher_top_k: int = 0, teacher_top_max: int = 65_536) -> HintJudged:
    validate_transition(transition)
    if selection is not HintSelection.LONGEST and teacher is None:
        raise ValueError(f"hint selection {selection.value} needs a teacher engine")
    prompt = judge.prompt(transition)
    start = time.perf_counter()
    cast = list(await asyncio.gather(*(judge.vote(transition, prompt, i) for i in range(votes))))
    raise_if_unreachable(cast, f"hint judge {judge.name}/{judge.model} on transition {transition.event_id}")
    cands = candidates(cast, min_chars)
    fields = dict(
        event_id=hints_id(transition, judge, selection, teacher),
        parent_ids=[transition.event_id, transition.turn.event_id], tenant=transition.tenant,
        session_id=transition.session_id, turn_index=transition.turn_index,
        transition_id=transition.event_id, turn_id=transition.turn.event_id,
        judge_model=judge.model, judge_version=judge.version, prompt_sha256=prompt.sha256,
        votes=cast,
    )
    if not cands:
        valid = [v for v in cast if v.score is not None]
        reason = ("no valid hint vote" if not valid else
                  "no positive vote" if all(v.score != 1 for v in valid) else
                  f"no positive vote with a hint of at least {min_chars} characters")
        return HintJudged(**fields, selection=selection, rejected_reason=reason)
    n = max(len(transition.turn.response_token_ids), 1)
    k_teacher = top_k_for(n, teacher_top_k, teacher_top_max)
    if len(cands) == 1 or selection is HintSelection.LONGEST:
        chosen = cands[0]
        used = HintSelection.LONGEST
        teacher_lp = version = top_ids = top_lps = None
        if teacher is not None:
            scores = await teacher.score(transition.turn, chosen.hint, k_teacher)
            teacher_lp, version = scores.logprobs, scores.policy_version
            top_ids, top_lps = top_rows(scores.top_ids, scores.top_logprobs, k_teacher)
        return HintJudged(**fields, candidates=cands, selection=used, accepted_hint=chosen.hint,
                          teacher_policy=teacher.policy.value if teacher else None,
                          teacher_policy_version=version, teacher_logprobs=teacher_lp,
                          teacher_top_ids=top_ids, teacher_top_logprobs=top_lps)
    student = await teacher.student(transition.turn, top_k)
    scored = await asyncio.gather(*(teacher.score(transition.turn, c.hint, max(top_k, k_teacher))
                                    for c in cands))
    # the overlap compares the first top_k of each row (engines give them most likely first)
    per = [overlaps(student.top_ids or [], [r[:top_k] for r in s.top_ids or []]) for s in scored]
    cands = [c.model_copy(update={"overlap_score": sum(o) / (n * top_k)}) for c, o in zip(cands, per)]
    if selection is HintSelection.OVERLAP_SEQUENCE:
        k = pick_sequence(per)
        picks = [k] * len(transition.turn.response_token_ids)
        accepted = cands[k].hint
    else:
        picks = pick_tokens(per)
        accepted = cands[Counter(picks).most_common(1)[0][0]].hint
    teacher_lp = [scored[k].logprobs[t] for t, k in enumerate(picks)]
    top_ids, top_lps = (top_rows([scored[k].top_ids[t] for t, k in enumerate(picks)],
                                 [scored[k].top_logprobs[t] for t, k in enumerate(picks)], k_teacher)
                        if k_teacher else (None, None))
    return HintJudged(**fields, candidates=cands, selection=selection, accepted_hint=accepted,
                      teacher_policy=teacher.policy.value, teacher_policy_version=scored[0].policy_version,
                      teacher_logprobs=teacher_lp, teacher_top_ids=top_ids, teacher_top_logprobs=top_lps)


async def with_answer(judged: HintJudged, transition: TransitionFormed, teacher: Teacher | None) -> HintJudged:
    """`judged` with the teacher's own answer under its accepted hint (step 5), if it wrote one
    that does not loop."""
    if teacher is None or judged.accepted_hint is None:
        return judged
    made = await teacher.answer(transition.turn, judged.accepted_hint)
    if made is None:
        return judged
    return judged.model_copy(update={"teacher_answer_ids": made.token_ids,
                                     "teacher_answer_logprobs": made.logprobs})


def handler(ctx: Context) -> Handler:
    s = ctx.settings.processors
    judge = build_hint_judge(s)
    selection = HintSelection(s.hint_selection)

    async def handle(event: TransitionFormed, key: bytes | None, partition: int, offset: int = -1) -> Result:
        judged = await judge_hints(event, judge, s.hint_votes, s.hint_min_chars, selection, ctx.teacher,
                                   s.overlap_top_k, s.teacher_top_k, s.teacher_top_max_entries)
        return Result([await with_answer(judged, event, ctx.teacher) if s.teacher_answers else judged])

    return handle


STAGE = Stage("hint", ("TransitionFormed",), ("HintJudged",), handler,
              "hindsight hint votes, selection and the teacher's logprobs", concurrent=True, teacher=True)
