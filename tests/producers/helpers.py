"""Helpers for the gateway tests: reading a namespace's topics, and `ScriptedEngine`.

`ScriptedEngine` answers with a given text instead of sampling (the tiny random model never
writes a tool call); its ids are the tokenizer's and its logprobs the real tiny model's
scores of them, so everything downstream of the engine runs as in production.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from infra.settings import Settings
from schemas.events import SamplingParams
from serving.engine import EngineInfo, Generation, TokenDelta

KEYS = {"acme": "k-acme-secret", "globex": "k-globex-secret"}


def read_events(settings: Settings, registry: Any, namespace: str, names: list[str],
                expect: int, timeout: float = 60.0, settle_s: float = 0.0) -> list[Any]:
    """Events on the namespace's topics: at least `expect` of them; then keep reading for
    `settle_s` more seconds to catch any extra (duplicates) that would follow."""
    import time

    from infra.kafka import EventConsumer

    consumer = EventConsumer(settings.kafka, registry, group_id=f"test-{uuid.uuid4().hex[:8]}",
                             namespace=namespace)
    consumer.subscribe(names)
    events: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(events) < expect:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(events)} of {expect} events arrived in {timeout:.0f}s")
            rec = consumer.poll(0.5)
            if rec is not None:
                events.append(rec.event)
        until = time.monotonic() + settle_s
        while time.monotonic() < until:
            rec = consumer.poll(0.2)
            if rec is not None:
                events.append(rec.event)
    finally:
        consumer.close()
    return events


class ScriptedEngine:
    """Answers every request with `script`, scored by a real engine (see module docstring)."""

    name = "scripted"

    def __init__(self, real: Any, tokenizer: Any, script: str) -> None:
        self.real, self.tokenizer = real, tokenizer
        self.ids = tokenizer.encode(script, add_special_tokens=False) + [tokenizer.eos_token_id]
        self.calls: list[list[int]] = []

    def info(self) -> EngineInfo:
        info = self.real.info()
        return EngineInfo(self.name, "scripted-tiny", info.policy_version, info.max_context)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        ids, lps = [], []
        async for d in self.stream(prompt_ids, params):
            ids.append(d.token_id)
            lps.append(d.logprob)
        return Generation(ids, lps, "stop", 0, len(prompt_ids))

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        self.calls.append(list(prompt_ids))
        ids = self.ids[:params.max_new_tokens]
        scores = await self.real.score(prompt_ids, ids)
        for i, (tok, lp) in enumerate(zip(ids, scores.logprobs, strict=True)):
            yield TokenDelta(tok, lp, ("stop" if i == len(ids) - 1 else None), 0)

    async def score(self, *a: Any, **kw: Any) -> Any:
        return await self.real.score(*a, **kw)

    async def close(self) -> None:
        return None


class SlowEngine:
    """A real engine whose every wait costs `delay_s` more: before a whole answer, and before
    each streamed token."""

    def __init__(self, real: Any, delay_s: float) -> None:
        self.real, self.delay_s, self.name = real, delay_s, real.name

    def info(self) -> EngineInfo:
        return self.real.info()

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        await asyncio.sleep(self.delay_s)
        return await self.real.generate(prompt_ids, params)

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        async for d in self.real.stream(prompt_ids, params):
            await asyncio.sleep(self.delay_s)
            yield d

    async def close(self) -> None:
        return None
