"""Stopping the gateway (what SIGTERM does): new turns are refused at once, turns still running
after `gateway.shutdown_grace_s` end with a clear 503 `shutting_down` (a stream with an error
event, its sampled tokens recorded as an aborted turn), and the server exits promptly instead
of waiting on them."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from producers.gateway.server import ServerThread
from producers.gateway.service import ShuttingDown
from producers.gateway.wire import ChatCompletionRequest
from schemas.events import SamplingParams, TurnRecorded
from serving.engine import EngineInfo, Generation, TokenDelta
from tests.producers.gateway_fixtures import engine, keyring, make_gateway, tokenizer  # noqa: F401
from tests.producers.helpers import KEYS


class HangingEngine:
    """Streams one token, then never another; a whole generation never ends."""

    name = "hanging"

    def __init__(self, real: Any) -> None:
        self.real = real
        self.started = threading.Semaphore(0)

    def info(self) -> EngineInfo:
        i = self.real.info()
        return EngineInfo(self.name, "hanging-tiny", i.policy_version, i.max_context)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        self.started.release()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        yield TokenDelta(prompt_ids[0], -0.5, None, 0)
        self.started.release()
        await asyncio.Event().wait()

    async def score(self, *a: Any, **kw: Any) -> Any:
        return await self.real.score(*a, **kw)

    async def close(self) -> None:
        return None


BODY = {"model": "tiny", "messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": 50}
AUTH = {"Authorization": f"Bearer {KEYS['acme']}"}


def test_stopping_ends_turns_in_flight_with_a_clear_503_after_the_grace_period(make_gateway, engine):
    hanging = HangingEngine(engine)
    gw = make_gateway(hanging, shutdown_grace_s=0.5)
    results: dict[str, Any] = {}
    server = ServerThread(gw)
    server.__enter__()
    url = f"{server.url}/v1/chat/completions"

    def whole() -> None:
        results["whole"] = httpx.post(url, json=BODY, headers=AUTH, timeout=30)

    def streamed() -> None:
        with httpx.stream("POST", url, json={**BODY, "stream": True}, headers=AUTH, timeout=30) as r:
            results["stream"] = [json.loads(line[6:]) for line in r.iter_lines()
                                 if line.startswith("data: ") and line != "data: [DONE]"]

    clients = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    for t in clients:
        t.start()
    assert hanging.started.acquire(timeout=30) and hanging.started.acquire(timeout=30)
    t0 = time.monotonic()
    server.__exit__(None, None, None)     # what a signal does: uvicorn's should_exit
    for t in clients:
        t.join(30)
    assert time.monotonic() - t0 < 5.0     # the grace period, not forever
    assert not server.thread.is_alive()

    whole_resp = results["whole"]
    assert whole_resp.status_code == 503 and whole_resp.headers["retry-after"]
    assert whole_resp.json()["error"]["code"] == "shutting_down"
    events = results["stream"]
    assert events[-1]["error"]["code"] == "shutting_down"
    assert "grace period" in events[-1]["error"]["message"]
    recorded = [s.event for s in gw.spool.read(100) if isinstance(s.event, TurnRecorded)]
    assert [t.finish_reason for t in recorded] == ["abort"]           # the stream's one token
    assert len(recorded[0].response_token_ids) == 1


def test_a_draining_gateway_refuses_new_turns(make_gateway, engine):
    gw = make_gateway(engine)

    async def go() -> None:
        gw.begin_drain(60)
        with pytest.raises(ShuttingDown):
            gw.prepare(ChatCompletionRequest.model_validate(BODY), "acme", {})

    asyncio.run(go())
