"""The training methods, in one table: what a sample needs and how its advantage is made.

| method   | reward term (w_rl · r) | teacher term (w_opd · clip(teacher − behaviour)) | assemble waits for      | a run skips a sample without teacher logprobs |
|----------|------------------------|--------------------------------------------------|-------------------------|-----------------------------------------------|
| RL       | yes                    | no                                               | judgement               | no                                            |
| OPD      | no                     | yes                                              | hint (+ teacher)        | yes                                           |
| COMBINED | yes                    | yes                                              | judgement and hint      | no (its reward term still trains)             |

Assemble (processors.assemble) reads `needs` to know which sides of a transition to wait for;
the learner (learner.losses) builds every method's advantage from its two terms, and skips a
sample that carries no signal for the run's method (`needs_teacher_logprobs`). A method is a
config value (`processors.method`, `learner.method`), parsed case-insensitively by `method()`.
Several learner runs with different methods can train on one sample log.

Pure: the standard library and schemas.events.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from schemas.events import Method


class Signal(StrEnum):
    JUDGEMENT = "judgement"   # a RewardJudged for the transition
    HINT = "hint"             # a HintJudged (with teacher logprobs when a hint was accepted)


@dataclass(frozen=True)
class MethodRule:
    reward_term: bool    # the judged reward is an advantage term
    teacher_term: bool   # the per-token teacher − behaviour gap is an advantage term

    @property
    def needs(self) -> frozenset[Signal]:
        return frozenset(({Signal.JUDGEMENT} if self.reward_term else set())
                         | ({Signal.HINT} if self.teacher_term else set()))

    @property
    def needs_teacher_logprobs(self) -> bool:
        """A sample without teacher logprobs carries nothing this method can train on."""
        return self.teacher_term and not self.reward_term


METHODS: dict[Method, MethodRule] = {
    Method.RL: MethodRule(reward_term=True, teacher_term=False),
    Method.OPD: MethodRule(reward_term=False, teacher_term=True),
    Method.COMBINED: MethodRule(reward_term=True, teacher_term=True),
}


def method(value: str | Method) -> Method:
    """`rl`, `RL`, Method.RL ... -> Method.RL; a clear error naming the known ones otherwise."""
    if isinstance(value, Method):
        return value
    try:
        return Method(str(value).strip().upper())
    except ValueError:
        known = ", ".join(m.value.lower() for m in Method)
        raise ValueError(f"unknown training method {value!r}; known: {known}") from None


def rule(value: str | Method) -> MethodRule:
    return METHODS[method(value)]
