"""Group: a task's n rollouts, their judged steps and their outcomes → SampleReady with advantages.

General agents roll a task out n times (a group). Every record of a group shares one Kafka key,
the group id (schemas.events.session_key), and every stage sends what it derives on the
partition it read from, so a group's transitions, their judgements and its EpisodeEnded events
all arrive here on one partition. The stage keeps, in its table:

| key              | value                                                              |
|------------------|--------------------------------------------------------------------|
| ``g|<group>``    | the group: rollouts that ended (per attempt), the steps seen, done  |
| ``t|<transition>``| one step's tokens (what its sample needs), until the group is emitted |
| ``j|<transition>``| a judgement read before its transition (another topic: any order) |

A rollout is *complete* when it ended (EpisodeEnded) and each of its steps (turn indices
``first_turn_index`` to ``first_turn_index + steps - 1`` of its session; the step index is the
position among them) has its transition and, for the ``step`` estimator, its judgement. A rollout that
ended in ERROR (the environment, the gateway or the verifier failed: not the agent's doing) is
counted as ended but never trained on. A group is emitted once one attempt has n ended rollouts
and all those without an error are complete (the first such attempt wins: a worker killed
mid-group reruns it as the next attempt), with at least ``min_size`` usable rollouts (or n, if
smaller), else dropped. At ``deadline_s`` after its first record it is emitted with the complete
rollouts of its best attempt, under the same minimum, or dropped; it never waits longer. processors.advantages computes the advantages.

Each step becomes one RL sample: reward = the step's reward (o + c·p, or o), advantage as
computed (the learner trains on it as it is), loss mask all 0 for a dropped bucket (kept for the
record), and outcome, process reward, normaliser and group size recorded. The sample id is
``derived_id("group", transition id, estimator)``. Afterwards the group leaves a ``done`` mark
(kept ``done_retention_s``) so late records change nothing.

Transitions and judgements that are not of a rollout's step (personal agents) are assemble's,
not this stage's. An outcome that is not a finite number counts as an ERROR rollout.
Pure: ``on_transition``, ``on_judgement``, ``on_episode_end``, ``on_check`` take the table (a
mapping) and return the writes and the samples; ``handler`` applies them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from infra.settings import GroupSettings, Settings
from processors.advantages import StepAdvantage, outcome_only, stepwise
from processors.dead_letters import InvalidRecord, validate_sample
from processors.stage import Context, ControlSend, Handler, Result, Stage, Timer
from schemas.events import (
    EpisodeEnded,
    EpisodeStarted,
    Method,
    RewardJudged,
    SampleReady,
    TransitionFormed,
    TurnType,
    derived_id,
)


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_table(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Ended(_Row):
    """One rollout's EpisodeEnded, as the group needs it."""

    event_id: str
    session_id: str
    outcome: float
    steps: int
    first: int = 0               # the gateway's index of its first turn: steps are first .. first+steps-1
    ended: str = "ANSWERED"      # schemas.events.EpisodeEnd; an ERROR rollout is not trained on


class StepRef(_Row):
    session_id: str
    turn_index: int
    attempt: int
    rollout_index: int
    process: float | None = None        # the judgement's vote mean (majority for older judges)
    judgement_id: str | None = None


class Group(_Row):
    group_id: str
    partition: int
    first_seen: float
    size: int | None = None                             # n, from EpisodeEnded.group_size
    ended: dict[str, Ended] = {}                        # "<attempt>:<rollout index>" -> its end
    steps: dict[str, StepRef] = {}                      # transition id -> the step
    done: bool = False
    done_at: float | None = None
    emitted_attempt: int | None = None
    outcome_note: str | None = None


class StepData(_Row):
    """What a step's sample needs from its transition."""

    group_id: str
    transition_id: str
    turn_id: str
    tenant: str
    session_id: str
    turn_index: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]
    policy_version: int


class Pending(_Row):
    """A judgement read before its transition."""

    process: float
    judgement_id: str
    at: float
    partition: int


def group_key(group_id: str) -> str:
    return f"g|{group_id}"


def step_key(transition_id: str) -> str:
    return f"t|{transition_id}"


def judged_key(transition_id: str) -> str:
    return f"j|{transition_id}"


def _slot(attempt: int, rollout_index: int) -> str:
    return f"{attempt}:{rollout_index}"


@dataclass
class Step:
    writes: dict[str, dict[str, Any] | None] = field(default_factory=dict)   # None: delete
    outputs: list[SampleReady] = field(default_factory=list)
    note: str | None = None


def _load(table: Mapping[str, Any], key: str, cls: type) -> Any:
    value = table.get(key)
    return None if value is None else cls.model_validate(value)


def _process_of(j: RewardJudged) -> float:
    return float(j.vote_mean) if j.vote_mean is not None else float(j.majority)


# -- the pure steps ---------------------------------------------------------------------------

def on_transition(table: Mapping[str, Any], tf: TransitionFormed, partition: int, now: float,
                  s: GroupSettings) -> Step:
    ep = tf.turn.episode
    if ep is None or tf.turn.turn_type is not TurnType.MAIN:
        return Step(note="not a step of a rollout")
    g = _load(table, group_key(ep.group_id), Group) or Group(group_id=ep.group_id, partition=partition, first_seen=now)
    if g.done:
        return Step(note="step of a group already emitted")
    if tf.event_id in g.steps:
        return Step(note="duplicate transition")
    step = StepRef(session_id=tf.session_id, turn_index=tf.turn_index, attempt=ep.attempt,
                   rollout_index=ep.rollout_index)
    writes: dict[str, Any] = {}
    early = _load(table, judged_key(tf.event_id), Pending)
    if early is not None:
        step = step.model_copy(update={"process": early.process, "judgement_id": early.judgement_id})
        writes[judged_key(tf.event_id)] = None
    turn = tf.turn
    writes[step_key(tf.event_id)] = StepData(
        group_id=ep.group_id, transition_id=tf.event_id, turn_id=turn.event_id, tenant=tf.tenant,
        session_id=tf.session_id, turn_index=tf.turn_index, prompt_token_ids=turn.prompt_token_ids,
        response_token_ids=turn.response_token_ids, response_logprobs=turn.response_logprobs,
        policy_version=turn.policy_version).to_table()
    g = g.model_copy(update={"steps": {**g.steps, tf.event_id: step}})
    return _settle(table, g, writes, now, s, deadline=False)


def on_judgement(table: Mapping[str, Any], j: RewardJudged, partition: int, now: float,
                 s: GroupSettings) -> Step:
    if j.group_id is None:
        return Step(note="judgement of a turn that is not a step of a rollout")
    data = _load(table, step_key(j.transition_id), StepData)
    if data is None:   # its transition is not read yet (or its group was emitted: swept later)
        if judged_key(j.transition_id) in table:
            return Step(note="duplicate judgement")
        return Step({judged_key(j.transition_id): Pending(
            process=_process_of(j), judgement_id=j.event_id, at=now, partition=partition).to_table()},
            note="judgement held until its transition is read")
    g = _load(table, group_key(data.group_id), Group)
    if g is None or g.done:
        return Step(note="judgement of a group already emitted")
    step = g.steps.get(j.transition_id)
    if step is None or step.judgement_id is not None:
        return Step(note="duplicate judgement")
    step = step.model_copy(update={"process": _process_of(j), "judgement_id": j.event_id})
    g = g.model_copy(update={"steps": {**g.steps, j.transition_id: step}})
    return _settle(table, g, {}, now, s, deadline=False)


def on_episode_end(table: Mapping[str, Any], e: EpisodeEnded, partition: int, now: float,
                   s: GroupSettings) -> Step:
    g = _load(table, group_key(e.group_id), Group) or Group(group_id=e.group_id, partition=partition, first_seen=now)
    if g.done:
        return Step(note="episode end of a group already emitted")
    slot = _slot(e.attempt, e.rollout_index)
    if slot in g.ended:
        return Step(note="duplicate episode end")
    finite = math.isfinite(e.outcome)   # a NaN clamped would be +1: a broken verifier is an ERROR
    ended = Ended(event_id=e.event_id, session_id=e.session_id,
                  outcome=max(-1.0, min(1.0, e.outcome)) if finite else 0.0, steps=e.steps,
                  first=e.first_turn_index, ended=e.ended.value if finite else "ERROR")
    size = e.group_size if e.group_size else g.size
    g = g.model_copy(update={"ended": {**g.ended, slot: ended}, "size": size})
    return _settle(table, g, {}, now, s, deadline=False)


def on_check(table: Mapping[str, Any], key: str, now: float, s: GroupSettings) -> Step:
    """The periodic check: a group past its deadline is emitted or dropped; a finished group's
    mark and a judgement whose transition never came are forgotten after their time."""
    if key.startswith("j|"):
        p = _load(table, key, Pending)
        if p is not None and now - p.at >= s.deadline_s:
            return Step({key: None}, note="judgement with no transition dropped after the deadline")
        return Step(note="judgement still waiting")
    g = _load(table, key, Group)
    if g is None:
        return Step(note="check for a group no longer kept")
    if g.done:
        if now - (g.done_at or 0) >= s.done_retention_s:
            return Step({key: None}, note="finished group forgotten")
        return Step(note="finished group kept")
    if now - g.first_seen < s.deadline_s:
        return Step(note="group before its deadline")
    return _settle(table, g, {}, now, s, deadline=True)


def needs_check(key: str, value: Mapping[str, Any], now: float, s: GroupSettings) -> bool:
    if key.startswith("j|"):
        return now - value.get("at", now) >= s.deadline_s
    if key.startswith("g|"):
        if value.get("done"):
            return now - (value.get("done_at") or 0) >= s.done_retention_s
        return now - value.get("first_seen", now) >= s.deadline_s
    return False


# -- deciding and emitting --------------------------------------------------------------------

def complete_rollouts(g: Group, attempt: int, need_judgement: bool) -> dict[int, tuple[Ended, list[str]]]:
    """rollout index -> (its end, the transition ids of steps 0..steps-1) for every rollout of
    `attempt` that ended without an error and has every step (judged, when the estimator needs it)."""
    by_step: dict[tuple[str, int], str] = {}   # (session, turn index) -> transition id
    for tid, st in g.steps.items():
        if st.attempt == attempt and (st.process is not None or not need_judgement):
            by_step.setdefault((st.session_id, st.turn_index), tid)
    out = {}
    for slot, end in g.ended.items():
        a, k = (int(x) for x in slot.split(":"))
        if a != attempt or end.ended == "ERROR":
            continue
        tids = [by_step.get((end.session_id, end.first + t)) for t in range(end.steps)]
        if all(tids):
            out[k] = (end, tids)
    return out


def _settle(table: Mapping[str, Any], g: Group, writes: dict[str, Any], now: float, s: GroupSettings,
            deadline: bool) -> Step:
    need_judgement = s.estimator == "step"
    attempts = sorted({int(slot.split(":")[0]) for slot in g.ended})
    usable = {a: complete_rollouts(g, a, need_judgement) for a in attempts}

    def all_in(a: int) -> bool:   # n ended, and every one that ended without an error has its steps
        ended = [end for slot, end in g.ended.items() if int(slot.split(":")[0]) == a]
        return bool(g.size) and len(ended) >= g.size and len(usable[a]) == sum(e.ended != "ERROR" for e in ended)

    least = min(s.min_size, g.size or s.min_size)
    chosen = next((a for a in attempts if all_in(a)), None)
    if chosen is None and not deadline:
        return Step({**writes, group_key(g.group_id): g.to_table()})
    when = "" if chosen is not None else " at its deadline"
    if chosen is None:
        chosen = max(attempts, key=lambda a: (len(usable[a]), -a), default=None)
    have = len(usable[chosen]) if chosen is not None else 0
    if have < least:
        return _finish(g, writes, now, None, f"group dropped{when}: {have} usable rollouts of "
                       f"{g.size or '?'}, fewer than {least}")
    try:
        samples = emit(table, writes, g, usable[chosen], s)
    except InvalidRecord as exc:   # a step that cannot be a sample: the group ends here, said why
        return _finish(g, writes, now, None, f"group dropped: a step cannot be trained on: {exc}")
    done = _finish(g, writes, now, chosen, f"group emitted{when}: {have} of {g.size or '?'} rollouts")
    done.outputs = samples
    return done


def _finish(g: Group, writes: dict[str, Any], now: float, attempt: int | None, note: str) -> Step:
    out = dict(writes)
    for tid in g.steps:
        out[step_key(tid)] = None
    mark = Group(group_id=g.group_id, partition=g.partition, first_seen=g.first_seen, size=g.size,
                 done=True, done_at=now, emitted_attempt=attempt, outcome_note=note)
    out[group_key(g.group_id)] = mark.to_table()
    return Step(out, note=note)


def emit(table: Mapping[str, Any], writes: Mapping[str, Any], g: Group,
         rollouts: dict[int, tuple[Ended, list[str]]], s: GroupSettings) -> list[SampleReady]:
    """The samples of the chosen rollouts, advantages by the configured estimator."""
    if s.estimator == "step":
        rewards = {k: [end.outcome + s.process_weight * (g.steps[tid].process or 0.0) for tid in tids]
                   for k, (end, tids) in rollouts.items()}
        advantages = stepwise(rewards)
    else:
        advantages = outcome_only({k: end.outcome for k, (end, _) in rollouts.items()},
                                  {k: len(tids) for k, (_, tids) in rollouts.items()})
    samples = []
    for k, (end, tids) in sorted(rollouts.items()):
        for t, (tid, adv) in enumerate(zip(tids, advantages[k])):
            raw = writes.get(step_key(tid)) or table.get(step_key(tid))
            samples.append(_sample(StepData.model_validate(raw), g, g.steps[tid], end, adv, len(rollouts), t, s))
    return samples


def _sample(d: StepData, g: Group, st: StepRef, end: Ended, adv: StepAdvantage, size: int, step: int,
            s: GroupSettings) -> SampleReady:
    n = len(d.response_token_ids)
    parents = [d.turn_id, d.transition_id, end.event_id] + ([st.judgement_id] if st.judgement_id else [])
    sample = SampleReady(
        event_id=derived_id("group", d.transition_id, s.estimator), parent_ids=parents, tenant=d.tenant,
        session_id=d.session_id, turn_index=d.turn_index, method=Method.RL,
        prompt_token_ids=d.prompt_token_ids, response_token_ids=d.response_token_ids,
        loss_mask=[1 if adv.trained else 0] * n, behaviour_logprobs=d.response_logprobs,
        reward=adv.reward, policy_version=d.policy_version, task_group=g.group_id,
        step_index=step, outcome=end.outcome, process_reward=st.process,
        step_reward=adv.reward, advantage=adv.advantage, normaliser=adv.normaliser, group_size=size)
    validate_sample(sample)
    return sample


# -- the stage ----------------------------------------------------------------------------------

def handler(ctx: Context) -> Handler:
    s = ctx.settings.processors.group
    table = ctx.state

    async def handle(event: Any, key: bytes | None, partition: int, offset: int = -1) -> Result:
        now = time.time()
        if isinstance(event, bytes):   # a check request from the periodic scan
            step = on_check(table, json.loads(event)["key"], now, s)
        elif isinstance(event, TransitionFormed):
            step = on_transition(table, event, partition, now, s)
        elif isinstance(event, RewardJudged):
            step = on_judgement(table, event, partition, now, s)
        elif isinstance(event, EpisodeEnded):
            step = on_episode_end(table, event, partition, now, s)
        elif isinstance(event, EpisodeStarted):
            return Result(note="episode start (the group stage needs only ends)")
        else:
            raise TypeError(f"the group stage got a {type(event).__name__}")

        def keep() -> None:
            for k, v in step.writes.items():
                if v is None:
                    table.pop(k, None)
                else:
                    table[k] = v

        return Result(step.outputs, keep if step.writes else None, step.note)

    return handle


async def scan(settings: Settings, table: Mapping[str, Any], send: ControlSend) -> None:
    """Ask the handler (through the control topic, on the group's partition) to look at groups
    past their deadline, finished groups past their retention and judgements left alone."""
    s, now = settings.processors.group, time.time()
    for k, value in list(table.items()):
        if isinstance(value, Mapping) and needs_check(k, value, now, s):
            await send(k.encode(), json.dumps({"key": k}).encode(), value["partition"])


STAGE = Stage(
    "group", ("TransitionFormed", "RewardJudged", "EpisodeEnded"), ("SampleReady",), handler,
    "a task's n rollouts: judged steps and outcomes into samples with step-wise advantages",
    table="groups", timer=Timer(lambda s: min(30.0, max(1.0, s.processors.group.deadline_s / 10)), scan))
