"""Step-wise advantages for general agents: a group's rollouts of one task, step by step.

A task is rolled out n times (a group); rollout k has steps t = 0, 1, ... (its turns), each
with a process reward p (the mean of the step judge's valid ±1 votes) and the rollout's
outcome o in [-1, 1] from the task's verifier. Two estimators, chosen by configuration:

``step`` (PRM + outcome, OpenClaw-RL's track 2): the step reward is ``r = o + c·p``, and
rewards are normalised within each bucket (group, step index) across the rollouts that have
that step:

| bucket                          | advantage                          | normaliser |
|---------------------------------|------------------------------------|------------|
| one rollout has this step       | r, as it is                        | single     |
| every reward in it is equal     | 0, and the step is not trained on  | dropped    |
| otherwise                       | (r − mean) / (population std + ε)  | bucket     |

No global whitening. If every bucket of the group is dropped, the first step's bucket is kept
(advantage 0, normaliser ``kept``) so the group still yields samples for the record.

``outcome`` (GRPO, the baseline): the rollout's outcome normalised within the group,
``(o − mean) / (population std + ε)``, broadcast to all its steps; a group of one, or of equal
outcomes, gets 0.

Pure: the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

EPS = 1e-6


class Estimator(StrEnum):
    STEP = "step"         # PRM + outcome, per (group, step index)
    OUTCOME = "outcome"   # outcome only, per group (GRPO)


@dataclass(frozen=True)
class StepAdvantage:
    reward: float          # what was normalised: o + c·p (step) or o (outcome)
    advantage: float
    normaliser: str        # single | dropped | bucket | kept | group
    trained: bool          # False: the step carries nothing to learn (a dropped bucket)


def _z(values: Sequence[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (std + EPS) for v in values]


def step_rewards(outcome: float, process: Sequence[float], c: float = 1.0) -> list[float]:
    return [outcome + c * p for p in process]


def stepwise(rewards: Mapping[int, Sequence[float]]) -> dict[int, list[StepAdvantage]]:
    """rollout index -> its step rewards (o + c·p) → rollout index -> each step's advantage."""
    out = {k: [None] * len(rs) for k, rs in rewards.items()}
    steps = max((len(rs) for rs in rewards.values()), default=0)
    for t in range(steps):
        members = [(k, rs[t]) for k, rs in rewards.items() if t < len(rs)]
        values = [r for _, r in members]
        if len(members) == 1:
            k, r = members[0]
            out[k][t] = StepAdvantage(r, r, "single", True)
        elif max(values) - min(values) <= EPS:
            for k, r in members:
                out[k][t] = StepAdvantage(r, 0.0, "dropped", False)
        else:
            for (k, r), a in zip(members, _z(values)):
                out[k][t] = StepAdvantage(r, a, "bucket", True)
    if steps and not any(s.trained for steps_ in out.values() for s in steps_):
        for k, steps_ in out.items():
            if steps_:
                steps_[0] = StepAdvantage(steps_[0].reward, 0.0, "kept", True)
    return out


def outcome_only(outcomes: Mapping[int, float], steps: Mapping[int, int]) -> dict[int, list[StepAdvantage]]:
    """rollout index -> outcome, and its number of steps → the GRPO advantage on every step."""
    keys = list(outcomes)
    values = [outcomes[k] for k in keys]
    equal = len(values) < 2 or max(values) - min(values) <= EPS
    advantages = [0.0] * len(values) if equal else _z(values)
    return {k: [StepAdvantage(outcomes[k], a, "group", True)] * steps[k] for k, a in zip(keys, advantages)}


def toolcall_outcome(correct: bool, tool_calls: int, shaped: bool = True) -> float:
    """+1 for a verified correct answer; a wrong one gets ``min(−0.6, −1 + 0.05·(calls − 2))``
    when shaped (more tool use is penalised less, never above −0.6), else −1. Kept within
    [−1, 1] like every outcome: fewer than two calls give −1, not −1.05 or −1.1."""
    if correct:
        return 1.0
    return max(-1.0, min(-0.6, -1.0 + 0.05 * (tool_calls - 2))) if shaped else -1.0
