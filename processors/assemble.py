"""Assemble: judgements and hints joined per transition → SampleReady, by method.

Rule table (``r`` = the judgement's majority; "hint" = an accepted hint *with* teacher logprobs):

| method   | hint | r    | sample                                    | loss mask | teacher logprobs |
|----------|------|------|-------------------------------------------|-----------|------------------|
| rl       |  -   | ±1   | RL, reward r                              | all 1     | null             |
| rl       |  -   | 0    | RL, reward 0 (kept for the record)        | all 0     | null             |
| opd      | yes  |  -   | OPD, reward 0                             | all 1     | the teacher's    |
| opd      | no   |  -   | none — reason counted                     |           |                  |
| combined | yes  | ±1   | COMBINED, reward r                        | all 1     | the teacher's    |
| combined | yes  | 0    | OPD, reward 0                             | all 1     | the teacher's    |
| combined | no   | ±1   | RL, reward r                              | all 1     | **null** (never the rollout logprobs) |
| combined | no   | 0    | none — reason counted                     |           |                  |

Where the sample carries the teacher's logprobs it also carries the teacher's top-K rows, if the
hint stage recorded them.

Token ids and behaviour logprobs come from the transition's turn exactly as recorded; lengths
that do not match raise ``InvalidRecord`` (→ dead-letters), nothing is padded. The sample id is
``derived_id("assemble", transition id, method)``, so a re-run never duplicates a sample.

**Hindsight revisions** (``processors.revisions``, on by default). When a user corrects an
answer and the agent's next answer is approved, that answer, put after the first answer's
prompt, is a verified better answer to the same request: the sample ``revision(a, b)`` makes of
the two trains the policy to get it right the first time, where the rejected sample only says
"not this" and the hinted teacher only estimates what would have been right. The pair: the
sample of a transition ``a`` with reward < 0 and that of the transition of the main turn that
followed it (``a``'s ``next_turn_event_id``, set by sessionize) with reward > 0, whose prompt starts
with ``a``'s prompt token for token (it resent ``a``'s context; a client that rewrote history gets
no revision). The revision is an RL sample with a precomputed advantage of ``b``'s reward
(normaliser ``revision``: no batch baseline takes it away) and ``revision_of`` naming ``a``'s
sample; its behaviour logprobs are ``b``'s, taken under another context, so the learner uses its
own current policy as the proximal one (learner.trainer). What it cannot tell: whether the user
asked something else after the rejection (then ``b`` answers another question); the next main
turn right after a rejection is usually the redo.

**The teacher's own answers** (``processors.teacher_answers``, off by default). Where the hint
stage wrote the hinted teacher's own answer to a turn (processors.hint) and the turn's sample
uses that hint, the answer, put after the student's prompt, is a second sample: what the
hint-conditioned model says, where the teacher term only scores what the student said. The
teacher term moves the student at the tokens the student wrote; a hinted model that meets a
preference by taking another path early on (another phrasing, a shorter plan) shows that
path only in its own answer. An RL sample with advantage 1 (normaliser ``teacher``, the
learner weighs it by ``learner.teacher_answers``), reward 0 (no user judged it), and
``revision_of`` naming the student's sample, so the learner takes its own current policy as
the proximal one, as for a revision. Nobody approved it: it is as good as the teacher.

Whichever of the two transitions is decided first leaves a ``Waiting`` entry under
``revision_key`` (the later turn's id) with its sample, teacher rows left out, or a mark that it
can form no revision; the second takes it away. A transition whose conversation holds no earlier
answer leaves nothing as the later one. Entries whose other side never came are dropped after
``processors.revision_wait_s`` by the stage's timer, so the table does not grow with them.

The join waits for the sides its method needs (the transition and what schemas.methods lists:
rl a judgement, opd a hint, combined both) in a state keyed by transition id; once the sample is decided the
entry keeps only a ``done`` mark, so late duplicates change nothing. A transition that is a step of
a rollout (general agents: its turn names an episode) is not assembled here: its advantage needs
its group, so processors.group makes its sample; the join only marks it done. Pure: ``on_side`` and
``assemble``; ``handler`` keeps the join in the stage's table and ``STAGE`` declares it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from infra.settings import Settings
from processors.dead_letters import validate_sample
from processors.stage import Context, ControlSend, Handler, Result, Stage, Timer
from schemas.events import TEACHER_ANSWER, HintJudged, Method, RewardJudged, SampleReady, TransitionFormed, derived_id
from schemas.methods import METHODS
from schemas.methods import method as parse_method


class Side(StrEnum):
    TRANSITION = "transition"
    JUDGEMENT = "judgement"
    HINT = "hint"


def needs(m: Method) -> frozenset[Side]:
    """The sides the join waits for: the transition and what the method table says."""
    return frozenset({Side.TRANSITION, *(Side(signal.value) for signal in METHODS[m].needs)})


class Join(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    transition: TransitionFormed | None = None
    judgement: RewardJudged | None = None
    hint: HintJudged | None = None
    done: bool = False

    def has(self) -> frozenset[Side]:
        return frozenset(s for s in Side if getattr(self, s.value) is not None)

    def to_table(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_table(cls, value: dict[str, Any] | None) -> "Join | None":
        return None if value is None else cls.model_validate(value)


@dataclass
class Outcome:
    sample: SampleReady | None
    reason: str | None = None


@dataclass
class Step:
    state: Join | None
    outputs: list[SampleReady] = field(default_factory=list)
    note: str | None = None


def _teacher(hint: HintJudged | None) -> list[float] | None:
    if hint is None or hint.accepted_hint is None:
        return None
    return hint.teacher_logprobs


def _no_hint_reason(hint: HintJudged | None) -> str:
    if hint is None:
        return "no hint decision"
    if hint.accepted_hint is None:
        return f"hint rejected: {hint.rejected_reason}"
    return "hint accepted but no teacher logprobs (no teacher engine)"


def assemble(transition: TransitionFormed, judgement: RewardJudged | None, hint: HintJudged | None,
             method: Method) -> Outcome:
    r = judgement.majority if judgement is not None else 0
    teacher = _teacher(hint) if method is not Method.RL else None
    if method is Method.RL:
        kind, reward, masked = Method.RL, float(r), r == 0
    elif teacher is not None:
        kind = Method.COMBINED if (method is Method.COMBINED and r != 0) else Method.OPD
        reward, masked = float(r if kind is Method.COMBINED else 0), False
    elif method is Method.COMBINED and r != 0:
        kind, reward, masked = Method.RL, float(r), False
    else:
        why = _no_hint_reason(hint)
        return Outcome(None, why if method is Method.OPD else f"reward 0 and {why}")
    turn = transition.turn
    n = len(turn.response_token_ids)
    parents = [turn.event_id, transition.event_id]
    parents += [e.event_id for e in (judgement, hint) if e is not None]
    sample = SampleReady(
        event_id=derived_id("assemble", transition.event_id, method.value), parent_ids=parents,
        tenant=transition.tenant, session_id=transition.session_id, turn_index=transition.turn_index,
        method=kind, prompt_token_ids=turn.prompt_token_ids, response_token_ids=turn.response_token_ids,
        loss_mask=[0 if masked else 1] * n, behaviour_logprobs=turn.response_logprobs,
        teacher_logprobs=teacher, reward=reward, policy_version=turn.policy_version,
        teacher_top_ids=hint.teacher_top_ids if teacher is not None else None,
        teacher_top_logprobs=hint.teacher_top_logprobs if teacher is not None else None,
    )
    validate_sample(sample)
    return Outcome(sample)


def revision(a: SampleReady, b: SampleReady) -> SampleReady | None:
    """The hindsight revision of rejected sample `a` by approved sample `b`, the sample of the
    main turn after `a`'s (see the module docstring); None when the two do not form one."""
    if (a.session_id != b.session_id or a.tenant != b.tenant or not (a.reward < 0 < b.reward)
            or a.revision_of or b.revision_of or a.task_group is not None or b.task_group is not None
            or not any(a.loss_mask) or not any(b.loss_mask)):
        return None
    n = len(a.prompt_token_ids)
    if len(b.prompt_token_ids) <= n or b.prompt_token_ids[:n] != a.prompt_token_ids:
        return None
    sample = SampleReady(
        event_id=derived_id("revision", a.event_id, b.event_id),
        parent_ids=[*a.parent_ids[:1], a.event_id, *b.parent_ids[:1], b.event_id],   # turn, sample, turn, sample
        tenant=a.tenant, session_id=a.session_id, turn_index=a.turn_index, method=Method.RL,
        prompt_token_ids=a.prompt_token_ids, response_token_ids=b.response_token_ids,
        loss_mask=[1] * len(b.response_token_ids), behaviour_logprobs=b.behaviour_logprobs,
        reward=b.reward, policy_version=b.policy_version, advantage=b.reward, normaliser="revision",
        revision_of=a.event_id,
    )
    validate_sample(sample)
    return sample


def teacher_answer(sample: SampleReady, hint: HintJudged | None) -> SampleReady | None:
    """The hinted teacher's own answer to `sample`'s prompt, a sample of its own (see the module
    docstring); None where the hint carries none or `sample` does not use the hint."""
    if (hint is None or not hint.teacher_answer_ids or hint.teacher_answer_logprobs is None
            or sample.teacher_logprobs is None or sample.task_group is not None):
        return None
    n = len(hint.teacher_answer_ids)
    answer = SampleReady(
        event_id=derived_id("teacher-answer", sample.event_id), parent_ids=[*sample.parent_ids, sample.event_id],
        tenant=sample.tenant, session_id=sample.session_id, turn_index=sample.turn_index, method=Method.RL,
        prompt_token_ids=sample.prompt_token_ids, response_token_ids=hint.teacher_answer_ids,
        loss_mask=[1] * n, behaviour_logprobs=hint.teacher_answer_logprobs, reward=0.0,
        policy_version=sample.policy_version, advantage=1.0, normaliser=TEACHER_ANSWER, revision_of=sample.event_id,
    )
    validate_sample(answer)
    return answer


REVISION_PREFIX = "revise:"


def revision_key(tenant: str, later_turn_id: str) -> str:
    """Where the two sides of a revision meet: the later turn's id (the joins' keys are uuids)."""
    return f"{REVISION_PREFIX}{tenant}:{later_turn_id}"


class Waiting(BaseModel):
    """The first decided side of a possible revision. ``rejected``: the earlier transition's
    sample, if it was rejected (None with ``approved`` None: it forms no revision); ``approved``:
    the later one's, if it came first. ``at``: processing time it was written, for expiry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rejected: SampleReady | None = None
    approved: SampleReady | None = None
    at: float = 0.0
    partition: int = 0   # of the record that wrote it: the timer's request goes there


def _light(sample: SampleReady) -> SampleReady:
    return sample.model_copy(update={"teacher_logprobs": None, "teacher_top_ids": None,
                                     "teacher_top_logprobs": None})


def as_earlier(waiting: Waiting | None, sample: SampleReady | None, now: float,
               partition: int = 0) -> tuple[Waiting | None, list[SampleReady]]:
    """Transition `a` was decided (`sample`: its sample, None if it made none) and a main turn
    followed it: the revision with the later side if that came first (the entry goes), else
    what waits for it."""
    if waiting is not None and waiting.approved is not None:
        made = revision(sample, waiting.approved) if sample is not None else None
        return None, [made] if made is not None else []
    rejected = _light(sample) if sample is not None and sample.reward < 0 else None
    return Waiting(rejected=rejected, at=now, partition=partition), []


def as_later(waiting: Waiting | None, sample: SampleReady | None, follows_answer: bool,
             now: float, partition: int = 0) -> tuple[Waiting | None, list[SampleReady]]:
    """Transition `b` was decided: the revision with the earlier side if that came first (the
    entry goes); else, if `b` was approved and its conversation holds an earlier answer, `b`
    waits for that answer's transition."""
    if waiting is not None and waiting.approved is None:
        made = revision(waiting.rejected, sample) if waiting.rejected is not None and sample is not None else None
        return None, [made] if made is not None else []
    if waiting is None and sample is not None and sample.reward > 0 and follows_answer:
        return Waiting(approved=_light(sample), at=now, partition=partition), []
    return waiting, []


def follows_answer(transition: TransitionFormed) -> bool:
    """Whether the turn's conversation holds an earlier assistant answer (it can be a redo)."""
    messages = json.loads(transition.turn.messages_json)
    if transition.turn.continue_final_message and messages:
        messages = messages[:-1]   # the prefill is this turn's own answer
    return any(m.get("role") == "assistant" for m in messages)


def on_side(join: Join | None, side: Side, event: TransitionFormed | RewardJudged | HintJudged,
            method: Method) -> Step:
    """Record one side of a transition's join; assemble once the method's sides are in."""
    join = join or Join()
    if join.done:
        return Step(join, note=f"{side.value} after the sample was decided")
    if side is Side.TRANSITION and event.turn.episode is not None:
        # a step of a rollout: its sample needs the group's other rollouts (processors.group)
        return Step(Join(done=True), note="step of a rollout: the group stage makes its sample")
    wanted = needs(method)
    if side not in wanted:
        return Step(join if join.has() else None, note=f"{side.value} not used by method {method.value}")
    join = join.model_copy(update={side.value: event})
    if not wanted <= join.has():
        return Step(join)
    outcome = assemble(join.transition, join.judgement, join.hint, method)
    outputs = [outcome.sample] if outcome.sample else []
    if outcome.sample is not None and (answer := teacher_answer(outcome.sample, join.hint)) is not None:
        outputs.append(answer)
    return Step(Join(done=True), outputs, outcome.reason)


SIDES = {TransitionFormed: Side.TRANSITION, RewardJudged: Side.JUDGEMENT, HintJudged: Side.HINT}


def handler(ctx: Context) -> Handler:
    method = parse_method(ctx.settings.processors.method)
    # a sample without a reward (opd) is never a side of a revision
    revisions = ctx.settings.processors.revisions and METHODS[method].reward_term
    wait_s = ctx.settings.processors.revision_wait_s
    joins = ctx.state

    async def handle(event: Any, key: bytes | None, partition: int, offset: int = -1) -> Result:
        now = time.time()
        if isinstance(event, bytes):   # the timer: drop a revision entry whose other side never came
            k = json.loads(event)["key"]
            value = joins.get(k)
            if value is None or now - Waiting.model_validate(value).at < wait_s:
                return Result(note="revision entry not expired")
            return Result(keep=lambda: joins.pop(k, None), note="revision entry expired")
        side = SIDES[type(event)]
        k = event.event_id if side is Side.TRANSITION else event.transition_id
        before = Join.from_table(joins.get(k))
        step = on_side(before, side, event, method)
        outputs, note, waits = list(step.outputs), step.note, {}
        decided = step.state is not None and step.state.done and not (before is not None and before.done)
        transition = event if side is Side.TRANSITION else (before.transition if before is not None else None)
        if revisions and decided and transition is not None and transition.turn.episode is None:
            sample = outputs[0] if outputs else None
            made: list[SampleReady] = []
            # as the later side of a pair: under its own turn's id; as the earlier: its successor's
            later = revision_key(transition.tenant, transition.turn.event_id)
            was = _waiting(joins.get(later))
            # the messages are parsed only where the sample could wait for its earlier answer
            follows = was is None and sample is not None and sample.reward > 0 and follows_answer(transition)
            w, more = as_later(was, sample, follows, now, partition)
            if w is not was:
                waits[later] = w
            made += more
            if transition.next_turn_event_id is not None:
                earlier = revision_key(transition.tenant, transition.next_turn_event_id)
                was = _waiting(joins.get(earlier))
                w, more = as_earlier(was, sample, now, partition)
                if w is not was:
                    waits[earlier] = w
                made += more
            outputs += made
            if made:
                note = "revision"

        def keep() -> None:
            if step.state is None:
                joins.pop(k, None)
            else:
                joins[k] = step.state.to_table()
            for wk, w in waits.items():
                if w is None:
                    joins.pop(wk, None)
                else:
                    joins[wk] = w.model_dump(mode="json")

        changed = step.state is not before or bool(waits)
        return Result(outputs, keep if changed else None, note)

    return handle


def _waiting(value: dict | None) -> Waiting | None:
    return None if value is None else Waiting.model_validate(value)


async def scan(settings: Settings, table: Mapping[str, Any], send: ControlSend) -> None:
    """Ask the handler to drop revision entries older than ``revision_wait_s``."""
    now = time.time()
    for k, value in list(table.items()):
        if str(k).startswith(REVISION_PREFIX) and now - value.get("at", 0.0) >= settings.processors.revision_wait_s:
            await send(k.encode(), json.dumps({"key": k}).encode(), value.get("partition", 0))


STAGE = Stage("assemble", ("TransitionFormed", "RewardJudged", "HintJudged"), ("SampleReady",), handler,
              "judgements and hints joined per transition into samples, by method; hindsight revisions",
              table="joins", timer=Timer(lambda s: max(1.0, s.processors.revision_wait_s / 10), scan))
