"""The engine protocol every serving backend implements, and the name -> engine registry.

An engine turns token ids into token ids: it samples (returning the logprob of each sampled
token), scores a given continuation (what the teacher uses), loads new weights, and says
which policy version it is serving. It knows nothing about HTTP clients, chat messages or
Kafka: the gateway renders chat templates and records turns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from schemas.events import SamplingParams


class WeightsKind(StrEnum):
    FULL = "full"   # a Hugging Face model directory (config + safetensors)
    LORA = "lora"   # a peft adapter directory on top of the base model


@dataclass(frozen=True)
class Generation:
    """What one sampling call produced, token-exact."""

    token_ids: list[int]
    # logprob of each sampled token, same length as token_ids: the raw model logprob at
    # temperature 1 (log_softmax of the logits before temperature/top-p); see serving.sampling
    logprobs: list[float]
    finish_reason: str             # "stop" | "length" | "abort"
    policy_version: int
    prompt_tokens: int


@dataclass(frozen=True)
class TokenDelta:
    """One streamed step: the newly sampled token and its logprob."""

    token_id: int
    logprob: float
    finish_reason: str | None = None   # set on the last delta
    policy_version: int = 0            # the version whose weights sampled this token


@dataclass(frozen=True)
class Scores:
    """Logprobs of a given continuation under a given prompt."""

    logprobs: list[float]                          # one per continuation token
    top_ids: list[list[int]] | None = None         # per position, the k most likely ids
    top_logprobs: list[list[float]] | None = None  # and their logprobs
    policy_version: int = 0


@dataclass(frozen=True)
class EngineInfo:
    name: str
    model: str
    policy_version: int
    max_context: int
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A serving backend. All methods are safe to call concurrently."""

    name: str

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation: ...

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]: ...

    async def score(self, prompt_ids: list[int], continuation_ids: list[int],
                    top_k: int = 0, base: bool = False) -> Scores:
        """`base=True` scores with the frozen base weights (the default teacher)."""
        ...

    async def load_weights(self, path: str, kind: WeightsKind, version: int) -> None:
        """Switch atomically: calls in flight finish on the old weights."""
        ...

    async def relabel(self, version: int) -> bool:
        """Serve the weights served now as `version`, loading nothing: for a checkpoint whose
        weight files are byte for byte those being served (the learner skipped every step in
        between). False where this engine cannot; the caller then loads the checkpoint."""
        ...

    def info(self) -> EngineInfo: ...

    async def close(self) -> None: ...


ENGINES: dict[str, Callable[..., Engine]] = {}


def register_engine(name: str) -> Callable[[Callable[..., Engine]], Callable[..., Engine]]:
    def deco(factory: Callable[..., Engine]) -> Callable[..., Engine]:
        ENGINES[name] = factory
        return factory

    return deco
