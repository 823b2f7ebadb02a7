"""The engine over HTTP: what `nextstate serve` exposes so that another process (the gateway,
the teacher) can use an engine it does not host. Token ids in, token ids out; no chat, no
OpenAI shapes (that is the gateway's job).

    GET  /health                       {"status": "ok", "policy_version": n}
    GET  /info                         EngineInfo
    POST /generate  {prompt_ids, params, stream}
                    stream=false: Generation; stream=true: NDJSON, one TokenDelta per line,
                    or a final {"error": {...}} line if the engine fails mid-stream
    POST /score     {prompt_ids, continuation_ids, top_k, base}  ->  Scores

Errors: ``{"error": {"type", "message", ...}}`` with 400 for a context overflow (its numbers
included, so `serving.remote` can raise the same ContextLengthError), 422 for a malformed
body, 500 for other engine failures. A bearer key (``serving.api_key``) is checked in constant
time when set, and must be set to listen anywhere but loopback. Weight swaps are not an HTTP
operation: the reloader in the same process does them.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from infra.errors import ConfigError, ContextLengthError, NextstateError
from infra.settings import ServingSettings
from schemas.events import SamplingParams
from serving.engine import Engine


class GenerateBody(BaseModel):
    prompt_ids: list[int] = Field(min_length=1)
    params: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = False


class ScoreBody(BaseModel):
    prompt_ids: list[int] = Field(min_length=1)
    continuation_ids: list[int]
    top_k: int = Field(default=0, ge=0)
    base: bool = False


def error_body(exc: BaseException) -> dict[str, Any]:
    body: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, ContextLengthError):
        body.update(prompt_tokens=exc.prompt_tokens, max_new_tokens=exc.max_new_tokens,
                    max_context=exc.max_context)
    return {"error": body}


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(engine: Engine, settings: ServingSettings) -> FastAPI:
    key = settings.api_key.get_secret_value().encode() if settings.api_key else None
    if key is None and not is_loopback(settings.host):
        raise ConfigError(f"serving on {settings.host} needs NEXTSTATE_SERVING__API_KEY "
                          "(only loopback may go without one)")
    app = FastAPI(title="nextstate engine", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(given, key):
                return JSONResponse({"error": {"type": "Unauthorized", "message": "bad or missing bearer key"}},
                                    status_code=401)
        return await call_next(request)

    @app.exception_handler(NextstateError)
    async def engine_error(request: Request, exc: NextstateError):
        return _json(error_body(exc), 400 if isinstance(exc, ContextLengthError) else 500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "policy_version": engine.info().policy_version}

    @app.get("/info")
    async def info():
        return _json(dataclasses.asdict(engine.info()))

    @app.post("/generate")
    async def generate(body: GenerateBody):
        if not body.stream:
            return _json(dataclasses.asdict(await engine.generate(body.prompt_ids, body.params)))
        deltas = engine.stream(body.prompt_ids, body.params)
        try:  # surface a context overflow as a status code, before any byte is sent
            first = await anext(deltas)
        except StopAsyncIteration:
            first = None

        async def lines():
            try:
                if first is not None:
                    yield orjson.dumps(dataclasses.asdict(first)) + b"\n"
                async for d in deltas:
                    yield orjson.dumps(dataclasses.asdict(d)) + b"\n"
            except NextstateError as exc:
                yield orjson.dumps(error_body(exc)) + b"\n"
            finally:
                await deltas.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/score")
    async def score(body: ScoreBody):
        scores = await engine.score(body.prompt_ids, body.continuation_ids, body.top_k, body.base)
        return _json(dataclasses.asdict(scores))

    return app


async def serve_http(app: FastAPI, host: str, port: int, stop: "asyncio.Event",
                     keep_alive_timeout_s: float = 75.0) -> None:
    """Serve `app` until `stop` is set. The caller owns SIGINT/SIGTERM (uvicorn's own handling
    re-raises the signal after shutdown, which would kill the process before it cleans up).
    Idle connections stay open longer than our clients keep them (infra.http)."""
    import asyncio
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                   timeout_keep_alive=keep_alive_timeout_s))

    async def watch() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(watch())
    try:
        await server.serve()
    finally:
        watcher.cancel()
