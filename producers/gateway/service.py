"""One chat turn through the gateway: render once, sample token-in/token-out, record exactly.

`Gateway` holds what a running gateway needs (engine, tokenizer, spool, session tracker,
keys, metrics) and does the work behind the HTTP routes: prepare a turn (render the prompt
ids with the chat template once, pick the session, check the context), run it through the
engine (whole or streamed), and record a TurnRecorded with exactly the ids sent to the
engine and the ids and logprobs it sampled. Feedback and session ends become
FeedbackReceived. Everything recorded goes through the durable spool.

Side turns are served and recorded too, with turn_type SIDE (DESIGN: main/side is
recorded); processors decide what to learn from. No HTTP types here: `app.py` is the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from infra.errors import ContextLengthError, GatewayError


class ShuttingDown(GatewayError):
    """The gateway is stopping: a request arrived after it began, or outlived the grace period."""


_ABORT = "nextstate: the gateway's shutdown grace period ended"

ENGINE_WAIT: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("engine_wait", default=None)
"""Where a request's waits on the engine add up (seconds, in a one-element list the HTTP edge
sets per request; tasks it starts share the list): what the request spent in the gateway is
its whole time less this (producers.gateway.app.Edge, metric ``own_seconds``)."""


class UnknownModel(GatewayError):
    """A request named a model this gateway does not serve (nor map to the policy)."""


class MaxTokensError(GatewayError):
    """max_tokens larger than the model's whole context: no prompt could leave that much room."""

    def __init__(self, asked: int, max_context: int) -> None:
        super().__init__(f"max_tokens is {asked} but the model's context is {max_context} tokens "
                         f"(prompt and completion together); ask for fewer")
        self.asked, self.max_context = asked, max_context
from infra.settings import GatewaySettings
from producers.gateway.auth import KeyRing
from producers.gateway.chat import ToolCallParser, parser_for
from producers.gateway.constraints import request_grammar
from producers.gateway.decode import Final, TextAssembler
from producers.gateway.logprobs import TokenText, entries
from producers.gateway.metrics import GatewayMetrics
from producers.gateway.replies import Replies, client_request_id
from producers.gateway.sessions import Session, SessionRef, SessionTracker
from producers.gateway.spool import Spool, SpoolDrainer
from producers.gateway.wire import ChatCompletionRequest, FeedbackRequest
from schemas.events import (
    EpisodeRef,
    FeedbackKind,
    FeedbackReceived,
    SamplingParams,
    SessionSource,
    TurnRecorded,
    TurnType,
)
from serving.chat import normalize_messages, render_prompt
from serving.engine import Engine
from serving.models import sampling_defaults

log = logging.getLogger(__name__)


@dataclass
class Turn:
    """A request ready for the engine."""

    request_id: str
    tenant: str
    session: SessionRef
    turn_type: TurnType
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    prompt_ids: list[int]
    params: SamplingParams
    parser: ToolCallParser | None
    ends_session: bool
    started: float
    episode: EpisodeRef | None = None
    continue_final: bool = False      # the last message is a prefill the response continues
    asked_tokens: int | None = None   # what the client asked for, when it was clamped (cap or room left)


@dataclass
class Sampled:
    """Every token the engine sampled for a turn, as it sampled them."""

    version: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = "length"


@dataclass(frozen=True)
class Outcome:
    """What a finished turn returns to the client."""

    final: Final
    finish_reason: str
    completion_tokens: int
    policy_version: int
    turn_index: int
    sampled: Sampled | None = None


class Gateway:
    def __init__(self, settings: GatewaySettings, engine: Engine, tokenizer: Any, spool: Spool,
                 keys: KeyRing, drainer: SpoolDrainer | None = None, model_name: str | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.spool = spool
        self.keys = keys
        self.drainer = drainer
        # A model path would leak the server's filesystem layout; report its last component.
        self.model_name = model_name or settings.served_model_name or Path(engine.info().model).name
        self.model_names = frozenset([self.model_name, *settings.model_aliases])
        self.parser = parser_for(tokenizer, settings.tool_parser)
        # what a request that leaves temperature / top_p / top_k out samples with
        info = engine.info()
        self.sampling_defaults = (sampling_defaults(info.details.get("tokenizer") or info.model)
                                  if settings.sampling_defaults == "model" else {})
        if self.sampling_defaults:
            log.info("requests that leave them out sample with the model's %s (gateway.sampling_defaults)",
                     ", ".join(f"{k} {v}" for k, v in self.sampling_defaults.items()))
        self.token_text = TokenText(tokenizer)
        self.sessions = SessionTracker(settings.session_idle_timeout_s)
        self.replies = Replies(settings.replay_window)
        self.metrics = GatewayMetrics()
        self.metrics.bind(lambda: len(self.sessions), lambda: self.spool.depth,
                          lambda: drainer.delivered if drainer else 0,
                          lambda: drainer.failures if drainer else 0,
                          lambda: drainer.set_aside if drainer else 0)
        self._reaper: asyncio.Task | None = None
        self.draining = False               # shutdown began: no new turns
        self.aborting = False               # the grace period is over: turns in flight end
        self._engine_waits: set[asyncio.Task] = set()   # tasks waiting on the engine now

    def begin_drain(self, grace_s: float) -> None:
        """Refuse new turns now; end the ones in flight with ShuttingDown after `grace_s`."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: refusing new requests; those in flight get %.1fs", grace_s)
        asyncio.get_running_loop().call_later(grace_s, self._abort)

    def _abort(self) -> None:
        self.aborting = True
        if self._engine_waits:
            log.warning("shutting down: ending %d request(s) still waiting on the engine",
                        len(self._engine_waits))
        for task in list(self._engine_waits):
            task.cancel(msg=_ABORT)

    @contextlib.contextmanager
    def _abortable(self):
        """Around a wait on the engine: the grace period's end turns it into ShuttingDown."""
        if self.aborting:
            raise ShuttingDown("the gateway is shutting down; send the request again in a moment")
        task = asyncio.current_task()
        self._engine_waits.add(task)
        started = time.perf_counter()
        try:
            yield
        except asyncio.CancelledError as exc:
            if not (self.aborting and _ABORT in exc.args):
                raise
            task.uncancel()
            raise ShuttingDown("the gateway is shutting down and this request did not finish within "
                               "its grace period; send it again (a stream's tokens so far are recorded)") from None
        finally:
            self._engine_waits.discard(task)
            waited = ENGINE_WAIT.get()
            if waited is not None:
                waited[0] += time.perf_counter() - started

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.drainer is not None:
            self.drainer.start()
        self._reaper = asyncio.create_task(self._reap())

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self.drainer is not None:
            await asyncio.to_thread(self.drainer.stop, drain_timeout_s)

    async def _reap(self) -> None:
        interval = max(0.05, min(self.settings.session_idle_timeout_s / 4, 5.0))
        while True:
            await asyncio.sleep(interval)
            for session in self.sessions.expire():
                try:
                    end = self._session_end(session, "idle_timeout")
                    await self.record([(end, end.key)])
                except Exception:  # a spool write failed: say so, keep reaping the others
                    log.exception("could not record the idle end of session %s", session.session_id)

    # -- turns --------------------------------------------------------------------------------
    async def grammar(self, req: ChatCompletionRequest) -> str | None:
        """The grammar the request constrains its answer to (producers.gateway.constraints),
        built in a worker thread: the first one imports xgrammar (up to 2 s where torch is not
        loaded yet), a large schema takes milliseconds; neither may stall the event loop.
        None, at no cost, for a request that constrains nothing. Raises ChatError."""
        free_tools = req.tool_choice is None or req.tool_choice in ("auto", "none")
        if free_tools and (req.response_format is None or req.response_format.type == "text"):
            return None   # the common request: nothing dumped, nothing built
        tools = req.dumped_tools()
        return await asyncio.to_thread(request_grammar, req.response_format, req.tool_choice, tools, self.parser)

    def prepare(self, req: ChatCompletionRequest, tenant: str, headers: dict[str, str],
                grammar: str | None = None) -> Turn:
        """Render the prompt ids once and place the request in a session; `grammar` from
        `grammar()`. Raises ChatError (bad messages), ContextLengthError (prompt longer than
        the model's context) or ShuttingDown."""
        if self.draining:
            raise ShuttingDown("the gateway is shutting down; send the request again in a moment")
        if req.model is not None and req.model not in self.model_names:
            raise UnknownModel(f"the model {req.model!r} is not served here: this gateway serves "
                               f"{self.model_name!r} (also as {', '.join(map(repr, self.settings.model_aliases)) or 'nothing else'}); "
                               "an operator can add names with gateway.model_aliases")
        messages = req.dumped_messages()
        tools = req.dumped_tools()
        prompt_ids = render_prompt(self.tokenizer, normalize_messages(messages), tools, req.continue_final_message)
        info = self.engine.info()
        if len(prompt_ids) >= info.max_context:
            raise ContextLengthError(len(prompt_ids), 0, info.max_context)
        explicit = req.max_completion_tokens or req.max_tokens
        asked = explicit or self.settings.default_max_tokens
        if asked > info.max_context:
            raise MaxTokensError(asked, info.max_context)
        cap = self.max_tokens_cap(info.max_context)
        # Documented: max_new_tokens is clamped to the cap and to the room left in the context.
        default = self.sampling_defaults
        params = SamplingParams(
            temperature=default.get("temperature", 1.0) if req.temperature is None else req.temperature,
            top_p=default.get("top_p", 1.0) if req.top_p is None else req.top_p,
            top_k=default.get("top_k", 0) if req.top_k is None else max(0, req.top_k),
            max_new_tokens=min(asked, cap, info.max_context - len(prompt_ids)),
            seed=req.seed, stop=req.stop_list, grammar=grammar)
        kind = (headers.get("x-turn-type") or req.turn_type or "main").upper()
        if kind not in TurnType.__members__:
            raise GatewayError(f"X-Turn-Type {kind.lower()!r} is not one of main, side")
        episode = episode_of(headers)   # refused before the session tracker changes
        session_id, source = _explicit_session(req, headers, messages)
        ref = self.sessions.assign(tenant, messages, session_id, source, req.continue_final_message)
        done = headers.get("x-session-done", "").strip().lower() in ("1", "true", "yes")
        return Turn(client_request_id(headers) or uuid.uuid4().hex, tenant, ref, TurnType(kind), messages, tools, prompt_ids,
                    params, self.parser if tools else None, done, time.perf_counter(), episode,
                    req.continue_final_message,
                    explicit if explicit and params.max_new_tokens < explicit else None)

    def max_tokens_cap(self, max_context: int) -> int:
        return self.settings.max_tokens_cap or max(1, max_context // 4)

    async def complete(self, turn: Turn) -> Outcome:
        """Run a turn to the end (non-streaming) and record it."""
        assembler = TextAssembler(self.tokenizer, turn.params.stop, turn.parser)
        if turn.params.stop:  # stop strings are enforced here, so sample step by step
            sampled = Sampled(self.engine.info().policy_version)
            async for _ in self.stream_tokens(turn, assembler, sampled):
                pass
        else:
            with self._abortable():
                gen = await self.engine.generate(turn.prompt_ids, turn.params)
            sampled = Sampled(gen.policy_version, list(gen.token_ids), list(gen.logprobs), gen.finish_reason)
            assembler.push_many(sampled.ids)
        return await self.finish(turn, assembler.finish(), sampled)

    async def stream_tokens(self, turn: Turn, assembler: TextAssembler, out: "Sampled") -> AsyncIterator[str]:
        """Sample step by step, collecting every token into `out`; yields visible text."""
        async with contextlib.aclosing(self.engine.stream(turn.prompt_ids, turn.params)) as deltas:
            while True:
                with self._abortable():
                    d = await anext(deltas, None)
                if d is None:
                    break
                out.ids.append(d.token_id)
                out.logprobs.append(d.logprob)
                out.version = getattr(d, "policy_version", out.version)  # the weights that sampled it
                text = assembler.push(d.token_id)
                if text:
                    yield text
                if d.finish_reason:
                    out.finish = d.finish_reason
                    break
                if assembler.stopped:
                    out.finish = "stop"
                    break

    async def finish(self, turn: Turn, final: Final, sampled: "Sampled") -> Outcome:
        finish = sampled.finish
        if final.parsed.tool_calls:
            finish = "tool_calls"
        elif final.stopped_by:
            finish = "stop"
        index = self.sessions.take_index(turn.session, turn.episode.group_id if turn.episode else None)
        event = self.turn_event(turn, index, sampled, final.raw_text, finish)
        items: list[tuple[Any, str]] = [(event, event.key)]
        self.sessions.record_reply(turn.tenant, turn.session.session_id, final.parsed.content)
        if turn.ends_session:
            ended = self.sessions.end(turn.tenant, turn.session.session_id)
            end = self._session_end(ended, "client_done", turn.session, index, event.episode.group_id if event.episode else None)
            items.append((end, end.key))
        await self.record(items)
        m = self.metrics
        m.tokens.labels("prompt").inc(len(turn.prompt_ids))
        m.tokens.labels("completion").inc(len(sampled.ids))
        return Outcome(final, finish, len(sampled.ids), sampled.version, index, sampled)

    async def logprobs(self, turn: Turn, sampled: Sampled, top: int) -> tuple[dict[str, Any], int | None]:
        """OpenAI's `choices[0].logprobs` for a finished turn, and the policy version that scored
        its top-k (None without top-k); see producers.gateway.logprobs."""
        if not top or not sampled.ids:
            return {"content": entries(self.token_text, sampled.ids, sampled.logprobs), "refusal": None}, None
        with self._abortable():
            scores = await self.engine.score(turn.prompt_ids, sampled.ids, top_k=top, base=False)
        rows = entries(self.token_text, sampled.ids, sampled.logprobs, scores.top_ids, scores.top_logprobs)
        return {"content": rows, "refusal": None}, scores.policy_version

    def record_aborted(self, turn: Turn, sampled: "Sampled", assembler: TextAssembler) -> None:
        """A stream the client left (or the engine broke) mid-way: record what was sampled,
        finish_reason 'abort', synchronously (we may be inside a cancelled task)."""
        if not sampled.ids:
            return
        index = self.sessions.take_index(turn.session, turn.episode.group_id if turn.episode else None)
        raw = assembler.finish().raw_text
        event = self.turn_event(turn, index, sampled, raw, "abort")
        self.spool.append([(event, event.key)])
        self.metrics.turns.labels(turn.turn_type.value).inc()

    def turn_event(self, turn: Turn, index: int, sampled: "Sampled", text: str, finish: str) -> TurnRecorded:
        if len(sampled.ids) != len(sampled.logprobs):
            raise GatewayError(f"engine {self.engine.name} returned {len(sampled.ids)} tokens but "
                               f"{len(sampled.logprobs)} logprobs for request {turn.request_id}")
        return TurnRecorded(
            tenant=turn.tenant, session_id=turn.session.session_id, session_source=turn.session.source,
            turn_index=index, turn_type=turn.turn_type, request_id=turn.request_id,
            messages_json=orjson.dumps(turn.messages).decode(),
            tools_json=orjson.dumps(turn.tools).decode() if turn.tools else None,
            prompt_token_ids=turn.prompt_ids, response_token_ids=sampled.ids,
            response_logprobs=sampled.logprobs, response_text=text, finish_reason=finish,
            sampling=turn.params, policy_version=sampled.version, engine=self.engine.name,
            model=self.model_name, latency_ms=(time.perf_counter() - turn.started) * 1000, episode=turn.episode,
            continue_final_message=turn.continue_final)

    # -- feedback and session ends ------------------------------------------------------------
    async def feedback(self, tenant: str, fb: FeedbackRequest) -> FeedbackReceived:
        """Record one piece of a session's next state. A rollout's feedback is keyed by its group
        (schemas.events.session_key): the request names it (`group_id`, or `X-Group-Id`), or
        this gateway remembers it from the session's turns."""
        group = fb.group_id or self.sessions.group_of(tenant, fb.session_id)
        event = FeedbackReceived(
            tenant=tenant, session_id=fb.session_id, turn_index=fb.turn_index, kind=fb.kind,
            text=fb.text, thumbs=fb.thumbs, reward=fb.reward, exit_code=fb.exit_code,
            passed=fb.passed, source=fb.source, parent_ids=fb.parent_ids,
            metadata_json=orjson.dumps(fb.metadata).decode() if fb.metadata is not None else None,
            group_id=group)
        if fb.kind is FeedbackKind.SESSION_END:
            self.sessions.end(tenant, fb.session_id)
        await self.record([(event, event.key)])
        return event

    async def end_session(self, tenant: str, session_id: str,
                          group_id: str | None = None) -> tuple[FeedbackReceived, Session | None]:
        session = self.sessions.end(tenant, session_id)
        event = self._session_end(session, "client_end", SessionRef(tenant, session_id, SessionSource.HEADER),
                                  group_id=group_id)
        await self.record([(event, event.key)])
        return event, session

    def _session_end(self, session: Session | None, reason: str, ref: SessionRef | None = None,
                     last_index: int | None = None, group_id: str | None = None) -> FeedbackReceived:
        tenant = session.tenant if session else ref.tenant
        sid = session.session_id if session else ref.session_id
        index = session.last_index if session else last_index
        group = group_id or (session.group_id if session else None)
        return FeedbackReceived(tenant=tenant, session_id=sid, turn_index=index,
                                kind=FeedbackKind.SESSION_END, source="gateway",
                                metadata_json=orjson.dumps({"reason": reason}).decode(), group_id=group)

    async def record(self, items: list[tuple[Any, str]]) -> None:
        """Durably spool events (fsync'd) before the client hears back."""
        await asyncio.to_thread(self.spool.append, items)
        for event, _ in items:
            if isinstance(event, TurnRecorded):
                self.metrics.turns.labels(event.turn_type.value).inc()
            else:
                self.metrics.feedback.labels(event.kind.value).inc()


SESSION_HEADERS = ("x-session-id", "session_id", "session-id", "x-session-affinity")
_RUNTIME_SESSION = re.compile(r"^Runtime:.*?\bsessionId=([A-Za-z0-9._:-]{1,128})", re.MULTILINE)


def _explicit_session(req: ChatCompletionRequest, headers: dict[str, str],
                      messages: list[dict[str, Any]] | None = None) -> tuple[str | None, SessionSource]:
    """The session a request names: `X-Session-Id`, or the session headers OpenClaw sends with
    `compat.sendSessionIdHeader` / `sendSessionAffinityHeaders` (`session_id`,
    `x-session-affinity`); else the body's `session_id` or `user`; else the `Runtime: ...
    sessionId=<id>` line OpenClaw writes into the first user message. None: derive one."""
    for name in SESSION_HEADERS:
        if headers.get(name, "").strip():
            return headers[name].strip()[:256], SessionSource.HEADER
    if req.session_id:
        return req.session_id, SessionSource.BODY
    if req.user:
        return req.user[:256], SessionSource.BODY
    messages = req.dumped_messages() if messages is None else messages   # the caller's, when it has them
    first_user = next((m for m in messages if m.get("role") == "user"), None)
    if first_user is not None:
        content = first_user.get("content")
        text = content if isinstance(content, str) else "\n".join(
            p.get("text", "") for p in content or [] if isinstance(p, dict))
        found = _RUNTIME_SESSION.search(text or "")
        if found:
            return found.group(1), SessionSource.BODY
    return None, SessionSource.DERIVED


EPISODE_HEADERS = ("x-task-id", "x-group-id", "x-rollout-index")


def episode_of(headers: dict[str, str]) -> EpisodeRef | None:
    """The rollout a turn is a step of, from `X-Task-Id`, `X-Group-Id`, `X-Rollout-Index` (all
    three, or none) and optionally `X-Env`, `X-Env-Version`, `X-Attempt`; GatewayError if partial."""
    given = {h: headers.get(h, "").strip() for h in EPISODE_HEADERS}
    if not any(given.values()):
        return None
    missing = [h for h, v in given.items() if not v]
    if missing:
        raise GatewayError(f"an episode needs X-Task-Id, X-Group-Id and X-Rollout-Index; missing {', '.join(missing)}")
    numbers = {}
    for name in ("x-rollout-index", "x-attempt"):
        raw = headers.get(name, "0").strip() or "0"
        if not (raw.isascii() and raw.isdigit()) or int(raw) > 2**31 - 1:
            raise GatewayError(f"{name} must be a whole number from 0 to 2147483647, got {raw[:20]!r}")
        numbers[name] = int(raw)
    return EpisodeRef(task_id=given["x-task-id"][:256], group_id=given["x-group-id"][:256],
                      rollout_index=numbers["x-rollout-index"], env=headers.get("x-env", "").strip()[:128],
                      env_version=headers.get("x-env-version", "").strip()[:64], attempt=numbers["x-attempt"])
