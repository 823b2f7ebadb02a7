"""Server-sent events for a streamed chat turn, in OpenAI's chunk format.

A first chunk carries the assistant role; then one chunk per piece of visible text as the
engine samples it (real token-by-token streaming, not a fake single chunk); tool calls, once
the answer is complete and parsed, as `delta.tool_calls`; a chunk with `finish_reason`; with
`stream_options.include_usage` a last chunk with empty `choices` and `usage`; `[DONE]`. With
`logprobs: true` each chunk carries the logprobs of the tokens sampled since the one before
(tokens held back by a stop string or a tool call go with a later chunk, the finishing one at
the latest).

The turn is recorded (spooled, fsync'd) before the finishing chunk is sent. A client that
leaves mid-stream, or an engine that breaks, still gets what was sampled recorded, with
finish_reason `abort`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import StreamingResponse

from producers.gateway.decode import TextAssembler
from producers.gateway.logprobs import entries
from producers.gateway.service import Gateway, Sampled, ShuttingDown, Turn
from producers.gateway.wire import error_body

log = logging.getLogger(__name__)


def _event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def sse_stream(gw: Gateway, turn: Turn, include_usage: bool, logprobs: bool = False) -> AsyncIterator[bytes]:
    created = int(time.time())
    base = {"id": f"chatcmpl-{turn.request_id}", "object": "chat.completion.chunk",
            "created": created, "model": gw.model_name}
    usage_field = {"usage": None} if include_usage else {}

    assembler = TextAssembler(gw.tokenizer, turn.params.stop, turn.parser)
    sampled = Sampled(gw.engine.info().policy_version)
    sent = 0   # tokens whose logprobs went out

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        nonlocal sent
        lps = None
        if logprobs and len(sampled.ids) > sent:
            lps = {"content": entries(gw.token_text, sampled.ids[sent:], sampled.logprobs[sent:]), "refusal": None}
            sent = len(sampled.ids)
        return _event({**base, "choices": [{"index": 0, "delta": delta, "logprobs": lps,
                                            "finish_reason": finish}], **usage_field})
    recorded = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        first = True
        async with contextlib.aclosing(gw.stream_tokens(turn, assembler, sampled)) as tokens:
            async for text in tokens:
                if first:
                    gw.metrics.first_token.observe(time.perf_counter() - turn.started)
                    first = False
                yield chunk({"content": text})
        final = assembler.finish()
        outcome = await gw.finish(turn, final, sampled)
        recorded = True
        if final.delta:
            yield chunk({"content": final.delta})
        for i, call in enumerate(final.parsed.tool_calls):
            yield chunk({"tool_calls": [call.openai(index=i)]})
        yield chunk({}, outcome.finish_reason)
        if include_usage:
            completion = outcome.completion_tokens
            yield _event({**base, "choices": [], "usage": {
                "prompt_tokens": len(turn.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(turn.prompt_ids) + completion}})
        yield b"data: [DONE]\n\n"
    except Exception as exc:  # the engine broke mid-stream, or the grace period ended: say so in-band
        if not recorded:
            gw.record_aborted(turn, sampled, assembler)
            recorded = True
        if isinstance(exc, ShuttingDown):
            yield _event(error_body(str(exc), "server_error", "shutting_down"))
        else:
            log.exception("stream %s failed", turn.request_id)
            yield _event(error_body(f"engine failed mid-stream: {exc}", "server_error"))
        yield b"data: [DONE]\n\n"
    finally:
        if not recorded:  # the client went away (task cancelled): keep what was sampled
            gw.record_aborted(turn, sampled, assembler)


class ClosingStreamingResponse(StreamingResponse):
    """Closes the event generator when sending fails (the client left), so the engine stops
    sampling for nobody and the partial turn is recorded now, not whenever GC gets to it."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()
