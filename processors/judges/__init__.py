"""Pluggable judges: the reward judge (+1/-1/0 per vote) and the hint judge, by name.

    judge = build_reward_judge(settings.processors)       # "feedback" | "llm"
    hint_judge = build_hint_judge(settings.processors)    # "feedback" | "llm"

A judge builds one prompt per transition (its sha256 is recorded) and casts one vote per
call; the stage runs m calls concurrently and takes the majority (processors.judge). A vote
that failed carries its error and no score; it never raises, except ``JudgeUnavailable`` when
the judge cannot be reached at all, so the stage retries instead of recording a false 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from infra.errors import ProcessorError
from infra.settings import ProcessorSettings
from processors.judges.prompts import JudgePrompt
from schemas.events import HintVote, JudgeVote, TransitionFormed


class JudgeUnavailable(ProcessorError):
    """The judge could not be reached for any vote; the transition must be retried, not scored."""


class RewardJudge(Protocol):
    name: str
    model: str
    version: str

    def prompt(self, transition: TransitionFormed) -> JudgePrompt: ...

    async def vote(self, transition: TransitionFormed, prompt: JudgePrompt, index: int) -> JudgeVote: ...


class HintJudge(Protocol):
    name: str
    model: str
    version: str

    def prompt(self, transition: TransitionFormed) -> JudgePrompt: ...

    async def vote(self, transition: TransitionFormed, prompt: JudgePrompt, index: int) -> HintVote: ...


def _feedback_reward(s: ProcessorSettings) -> RewardJudge:
    from processors.judges.feedback import FeedbackJudge, rules_from_settings

    return FeedbackJudge(rules_from_settings(s))


def _llm_reward(s: ProcessorSettings) -> RewardJudge:
    from processors.judges.llm import LLMRewardJudge, client_from_settings

    return LLMRewardJudge(client_from_settings(s))


def _feedback_hint(s: ProcessorSettings) -> HintJudge:
    from processors.judges.feedback import FeedbackHintJudge, rules_from_settings

    return FeedbackHintJudge(rules_from_settings(s))


def _llm_hint(s: ProcessorSettings) -> HintJudge:
    from processors.judges.llm import LLMHintJudge, client_from_settings

    return LLMHintJudge(client_from_settings(s))


REWARD_JUDGES: dict[str, Callable[[ProcessorSettings], RewardJudge]] = {
    "feedback": _feedback_reward,
    "llm": _llm_reward,
}
HINT_JUDGES: dict[str, Callable[[ProcessorSettings], HintJudge]] = {
    "feedback": _feedback_hint,
    "llm": _llm_hint,
}


def _build(registry: dict[str, Callable], kind: str, name: str, s: ProcessorSettings):
    try:
        factory = registry[name]
    except KeyError:
        raise ProcessorError(f"no {kind} judge named {name!r}; known: {sorted(registry)}") from None
    return factory(s)


def build_reward_judge(s: ProcessorSettings, name: str | None = None) -> RewardJudge:
    return _build(REWARD_JUDGES, "reward", name or s.judge, s)


def build_hint_judge(s: ProcessorSettings, name: str | None = None) -> HintJudge:
    return _build(HINT_JUDGES, "hint", name or s.hint_judge, s)


def raise_if_unreachable(votes: list[JudgeVote] | list[HintVote], what: str) -> None:
    """No vote reached the judge: retrying is right, a 0 verdict would be a false record."""
    if votes and all((v.error or "").startswith("unreachable:") for v in votes):
        raise JudgeUnavailable(f"{what}: every one of {len(votes)} vote(s) failed: {votes[0].error}")
