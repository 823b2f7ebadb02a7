"""The HTTP edge of the recording gateway: OpenAI-compatible routes over a `Gateway`.

Routes: `POST /v1/chat/completions` (whole or SSE-streamed token by token), `GET /v1/models`
and `GET /v1/models/{id}`, `POST /v1/feedback`, `POST /v1/sessions/{id}/end`, `GET /metrics`
(Prometheus), and `GET /healthz`. Every route but `/healthz` needs `Authorization: Bearer <key>`
(401); any other route is a 404 in OpenAI's error body that names these.

Only this module turns errors into status codes: malformed JSON 400, invalid fields 400 as
OpenAI and vLLM answer them (the message names each field, `param` the first; the SDKs raise
`BadRequestError`), bodies over `max_body_bytes` 413 (Content-Length or the
bytes actually received), a prompt longer than the context or a max_tokens larger than it 400
`context_length_exceeded`, a `model` the gateway neither serves nor maps
(`gateway.model_aliases`) 404 `model_not_found`, a broken engine 502. Responses carry `X-Policy-Version`,
`X-Session-Id`, `X-Request-Id`, and `X-Max-Tokens-Clamped` when max_tokens was cut to the cap
(`gateway.max_tokens_cap`) or to the room the prompt leaves.

The POST routes take a client's `X-Request-Id` (or `Idempotency-Key`): a retry with the same
id gets the first answer (`X-Replayed: true`) and records nothing (producers.gateway.replies).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from infra.errors import ChatError, ContextLengthError, GatewayError, NextstateError, ServingError
from producers.gateway.auth import bearer
from producers.gateway.replies import ReplayConflict, Reply, client_request_id
from producers.gateway.service import ENGINE_WAIT, Gateway, MaxTokensError, Outcome, ShuttingDown, Turn, UnknownModel
from producers.gateway.streaming import ClosingStreamingResponse, sse_stream
from producers.gateway.wire import ChatCompletionRequest, FeedbackRequest, describe, error_body, first_field

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers
        self.param = param


def _route_label(path: str) -> str:
    if path.startswith("/v1/sessions/"):
        return "/v1/sessions/{id}/end"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in {"/v1/chat/completions", "/v1/models", "/v1/feedback", "/metrics",
                            "/healthz"} else "other"


class Edge:
    """ASGI middleware: refuses oversized bodies (413) and counts requests and latency; for chat
    completions, also the gateway's own share of it (the time outside waits on the engine)."""

    def __init__(self, app: Any, gateway: Gateway) -> None:
        self.app, self.gw = app, gateway

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.gw.settings.max_body_bytes
        route, started, status = _route_label(scope["path"]), time.perf_counter(), [500]
        waited = [0.0]
        ENGINE_WAIT.set(waited)   # this request's task (and the tasks it starts) add to it
        # a chat answer's own time is observed unless it failed or was replayed (a replay waited
        # on the first attempt, not on the engine)
        own = route == "/v1/chat/completions"

        async def counted_send(message: dict) -> None:
            nonlocal own
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                own = own and status[0] == 200 and (b"x-replayed", b"true") not in message.get("headers", ())
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                took = time.perf_counter() - started
                self.gw.metrics.requests.labels(route, str(status[0])).inc()
                self.gw.metrics.latency.labels(route).observe(took)
                if own:
                    self.gw.metrics.observe_own(took - waited[0])

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            what = f"Content-Length {length.decode()!r}"
            return await _send_error(counted_send, 413 if length.isdigit() else 400,
                                     f"{what} exceeds the limit of {limit} bytes" if length.isdigit()
                                     else f"{what} is not a byte count")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _send_error(counted_send, 413, f"request body exceeds the limit of {limit} bytes")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later calls see the disconnect, for streaming responses

        await self.app(scope, replay, counted_send)


async def _send_error(send: Any, status: int, message: str) -> None:
    payload = orjson.dumps(error_body(message, code="request_too_large" if status == 413 else None))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def create_app(gw: Gateway, settings: Any = None, namespace: str | None = None,
               reload: bool = False, mount: Callable[[FastAPI], AbstractContextManager] | None = None) -> FastAPI:
    """The gateway app. With the full `settings`, `reload` follows `checkpoints` and hot-swaps
    the in-process engine (serving.reloader). `mount(app)` adds routes of the caller's (the
    command line mounts the ops view) and returns what runs beside them while the app serves."""
    if reload and settings is None:
        raise ValueError("reload needs the full settings object")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        async with AsyncExitStack() as stack:
            if reload:
                from serving.reloader import following

                await stack.enter_async_context(following(gw.engine, settings, namespace))
            if mounted is not None:
                stack.enter_context(mounted)
            try:
                yield
            finally:
                await gw.stop()

    app = FastAPI(title="nextstate gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gateway = gw
    mounted = mount(app) if mount is not None else None

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """A route or method not served here, in OpenAI's error body and saying what is."""
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"{request.method} {request.url.path} is not served here: this gateway serves "
                       "POST /v1/chat/completions, GET /v1/models, POST /v1/feedback and "
                       "POST /v1/sessions/{id}/end")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_body(message, code="not_found" if exc.status_code == 404 else None),
                            exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), exc.status,
                            headers=exc.headers)

    def tenant_of(request: Request) -> str:
        tenant = gw.keys.tenant_for(bearer(request.headers.get("authorization")))
        if tenant is None:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return tenant

    async def parse(request: Request, model: type) -> Any:
        raw = await request.body()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"body must be a JSON object, got {type(data).__name__}")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise ApiError(400, f"invalid request: {describe(exc)}", code="invalid_value",
                           param=first_field(exc)) from None

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "policy_version": gw.engine.info().policy_version}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        tenant_of(request)
        return Response(gw.metrics.render(), media_type=gw.metrics.content_type)

    def model_card() -> dict[str, Any]:
        info = gw.engine.info()
        return {"id": gw.model_name, "object": "model", "created": 0, "owned_by": "nextstate",
                "max_model_len": info.max_context, "policy_version": info.policy_version}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        tenant_of(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        """One model, as OpenAI's `models.retrieve` asks: the served one under any of its names."""
        tenant_of(request)
        if model not in gw.model_names:
            raise ApiError(404, f"the model {model!r} is not served here: this gateway serves "
                           f"{gw.model_name!r}", code="model_not_found")
        return {**model_card(), "id": model}

    async def once(request: Request, tenant: str, produce: Any, streamed: bool = False) -> Response:
        """Answer a request the client may retry: the same `X-Request-Id` gets the first answer
        (producers.gateway.replies), and nothing is recorded twice."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            rid = client_request_id(headers)
            # hashed only for a request that may be replayed: the common request pays nothing
            digest = gw.replies.digest(request.url.path, await request.body()) if rid else ""
            reply, replayed = await gw.replies.once(tenant, rid, digest, produce, streamed=streamed)
        except ReplayConflict as exc:
            raise ApiError(exc.status, str(exc), code="request_id_reused") from None
        except GatewayError as exc:
            raise ApiError(400, str(exc)) from None
        if isinstance(reply.body, Response):
            return reply.body
        extra = {"X-Replayed": "true"} if replayed else {}
        return JSONResponse(reply.body, reply.status, headers={**reply.headers, **extra})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        tenant = tenant_of(request)
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        return await once(request, tenant, lambda: _chat(request, tenant, req), streamed=bool(req.stream))

    async def _chat(request: Request, tenant: str, req: ChatCompletionRequest) -> Reply:
        try:
            grammar = await gw.grammar(req)
            turn = gw.prepare(req, tenant, {k.lower(): v for k, v in request.headers.items()}, grammar)
        except ContextLengthError as exc:
            raise ApiError(400, f"the prompt is {exc.prompt_tokens} tokens but the model's context is "
                           f"{exc.max_context} tokens; shorten the conversation",
                           code="context_length_exceeded") from None
        except MaxTokensError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        except ShuttingDown as exc:
            raise shutting_down(exc) from None
        except UnknownModel as exc:
            raise ApiError(404, str(exc), code="model_not_found") from None
        except (ChatError, GatewayError) as exc:
            raise ApiError(400, str(exc)) from None
        headers = {"X-Session-Id": turn.session.session_id, "X-Request-Id": turn.request_id}
        if turn.asked_tokens is not None:   # clamped (cap or room left): say so, the body says it too
            headers["X-Max-Tokens-Clamped"] = f"{turn.asked_tokens} -> {turn.params.max_new_tokens}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            headers["X-Policy-Version"] = str(gw.engine.info().policy_version)
            return Reply(200, ClosingStreamingResponse(sse_stream(gw, turn, include_usage, bool(req.logprobs)),
                                                       media_type="text/event-stream",
                                                       headers={**headers, "Cache-Control": "no-cache"}), headers)
        try:
            outcome = await gw.complete(turn)
        except ShuttingDown as exc:
            raise shutting_down(exc) from None
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        except NextstateError as exc:
            log.exception("request %s failed", turn.request_id)
            raise ApiError(502 if isinstance(exc, ServingError) else 500, f"engine failed: {exc}",
                           "server_error") from None
        headers["X-Policy-Version"] = str(outcome.policy_version)
        body = completion_body(gw, turn, outcome)
        if req.logprobs and outcome.sampled is not None:
            top = req.top_logprobs or 0
            try:
                body["choices"][0]["logprobs"], scored_by = await gw.logprobs(turn, outcome.sampled, top)
                if scored_by is not None:
                    body["nextstate"]["top_logprobs_policy_version"] = scored_by
            except (ShuttingDown, NextstateError) as exc:
                # The turn is recorded: answer it (an error would have the client send it again and
                # record it twice), with the sampled tokens' logprobs and why the top-k are missing.
                log.warning("request %s: scoring its top_logprobs failed: %s", turn.request_id, exc)
                body["choices"][0]["logprobs"], _ = await gw.logprobs(turn, outcome.sampled, 0)
                body["nextstate"]["top_logprobs_error"] = f"scoring the top {top} failed: {exc}"
        return Reply(200, body, headers)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        tenant = tenant_of(request)
        fb: FeedbackRequest = await parse(request, FeedbackRequest)
        group = request.headers.get("x-group-id", "").strip()[:256]
        if group and fb.group_id is None:
            fb = fb.model_copy(update={"group_id": group})

        async def record() -> Reply:
            event = await gw.feedback(tenant, fb)
            return Reply(200, {"event_id": event.event_id, "session_id": event.session_id,
                               "kind": event.kind.value}, {})

        return await once(request, tenant, record)

    @app.post("/v1/sessions/{session_id}/end")
    async def end_session(session_id: str, request: Request) -> Response:
        tenant = tenant_of(request)
        if not re.fullmatch(r"[^\x00-\x1f]{1,256}", session_id):
            raise ApiError(400, f"session id {session_id[:40]!r} is empty, too long or has control characters")

        async def record() -> Reply:
            group = request.headers.get("x-group-id", "").strip()[:256] or None
            event, session = await gw.end_session(tenant, session_id, group)
            return Reply(200, {"event_id": event.event_id, "session_id": session_id,
                               "known": session is not None, "turns": session.turns if session else None}, {})

        return await once(request, tenant, record)

    return Edge(app, gw)  # type: ignore[return-value]


def shutting_down(exc: ShuttingDown) -> ApiError:
    return ApiError(503, str(exc), "server_error", "shutting_down", {"Retry-After": "5"})


def completion_body(gw: Gateway, turn: Turn, outcome: Outcome) -> dict[str, Any]:
    parsed = outcome.final.parsed
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        message["tool_calls"] = [c.openai() for c in parsed.tool_calls]
    return {
        "id": f"chatcmpl-{turn.request_id}", "object": "chat.completion", "created": int(time.time()),
        "model": gw.model_name,
        "choices": [{"index": 0, "message": message, "finish_reason": outcome.finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": len(turn.prompt_ids), "completion_tokens": outcome.completion_tokens,
                  "total_tokens": len(turn.prompt_ids) + outcome.completion_tokens},
        "nextstate": {"session_id": turn.session.session_id, "turn_index": outcome.turn_index,
                      "policy_version": outcome.policy_version,
                      **({"max_tokens_clamped": {"asked": turn.asked_tokens, "to": turn.params.max_new_tokens}}
                         if turn.asked_tokens is not None else {})},
    }
