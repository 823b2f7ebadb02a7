"""Judge: a process reward model scores each action by its next state → RewardJudged.

``judge_transition(transition, judge, votes)`` asks the judge for `votes` votes at once
(asyncio.gather; the llm judge's client bounds the calls in flight), takes the majority
(processors.voting: ties and no valid vote → 0) and records every vote's raw text, parsed
score, latency and error, the judge's name/model/version, the prompt's sha256 and the total
latency. The event id is derived from the transition and the judge, so re-judging the same
transition with the same judge never duplicates a judgement downstream, while a new judge
(replay) gets its own ids.

Raises ``JudgeUnavailable`` when no vote reached the judge, so the wiring retries instead of
writing a 0 that nobody decided. Knows nothing about Kafka.
"""

from __future__ import annotations

import asyncio
import time

from processors.dead_letters import validate_transition
from processors.judges import RewardJudge, build_reward_judge, raise_if_unreachable
from processors.stage import Context, Handler, Result, Stage
from processors.voting import majority, vote_mean
from schemas.events import RewardJudged, TransitionFormed, derived_id


def judgement_id(transition: TransitionFormed, judge: RewardJudge) -> str:
    return derived_id("judge", transition.event_id, judge.name, judge.model, judge.version)


async def judge_transition(transition: TransitionFormed, judge: RewardJudge, votes: int) -> RewardJudged:
    validate_transition(transition)
    prompt = judge.prompt(transition)
    start = time.perf_counter()
    cast = await asyncio.gather(*(judge.vote(transition, prompt, i) for i in range(votes)))
    raise_if_unreachable(list(cast), f"judge {judge.name}/{judge.model} on transition {transition.event_id}")
    return RewardJudged(
        event_id=judgement_id(transition, judge),
        parent_ids=[transition.event_id, transition.turn.event_id],
        tenant=transition.tenant, session_id=transition.session_id,
        turn_index=transition.turn_index, transition_id=transition.event_id,
        turn_id=transition.turn.event_id, judge=judge.name, judge_model=judge.model,
        judge_version=judge.version, prompt_sha256=prompt.sha256, votes=list(cast),
        majority=majority(v.score for v in cast), vote_mean=vote_mean(v.score for v in cast),
        latency_ms=(time.perf_counter() - start) * 1000,
        group_id=transition.turn.episode.group_id if transition.turn.episode else None,
    )


def handler(ctx: Context) -> Handler:
    s = ctx.settings.processors
    judge = build_reward_judge(s)

    async def handle(event: TransitionFormed, key: bytes | None, partition: int, offset: int = -1) -> Result:
        return Result([await judge_transition(event, judge, s.judge_votes)])

    return handle


STAGE = Stage("judge", ("TransitionFormed",), ("RewardJudged",), handler,
              "m reward votes on each transition, majority", concurrent=True)
