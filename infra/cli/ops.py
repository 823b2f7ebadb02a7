"""The ops view: sessions, reward decisions, and reward and loss curves over time.

`OpsIndex` follows every topic of a namespace in a background thread and keeps small
aggregates (it is a read model of the log, rebuilt from offset 0 at start). `ops_router`
serves them as JSON and as one self-contained HTML page (inline SVG, no external assets),
behind the gateway's per-tenant API keys: Bearer, or HTTP Basic with the key as password so
a browser can open it. Mounted by the gateway under /ops, or run alone by `nextstate ops`.
"""

from __future__ import annotations

import base64
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse

from infra.kafka import EventConsumer, OnDecodeError
from infra.settings import Settings
from schemas.catalog import TOPICS, events_on
from schemas.events import (
    CheckpointPublished,
    DeadLettered,
    FeedbackReceived,
    RewardJudged,
    SampleReady,
    TurnRecorded,
)
from schemas.serde import registry_client

PAGE = Path(__file__).with_name("ops.html")


class OpsIndex:
    """Aggregates over the log, updated as events arrive."""

    def __init__(self, settings: Settings, namespace: str | None = None, keep: int = 2000) -> None:
        self.settings, self.namespace = settings, namespace
        self.sessions: dict[str, dict[str, Any]] = {}
        self.judgements: deque[dict[str, Any]] = deque(maxlen=keep)
        self.checkpoints: deque[dict[str, Any]] = deque(maxlen=keep)
        self.dead_letters: deque[dict[str, Any]] = deque(maxlen=50)
        self.counts = {name: 0 for name in TOPICS}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "OpsIndex":
        self._thread = threading.Thread(target=self._follow, name="ops-index", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _follow(self) -> None:
        consumer = EventConsumer(self.settings.kafka, registry_client(self.settings.registry),
                                 f"ops-{uuid.uuid4().hex}", self.namespace,
                                 on_decode_error=OnDecodeError.SKIP)
        parts = []
        for short in dict.fromkeys(TOPICS.values()):   # a topic once, even when it carries several events
            topic = consumer.topic(events_on(short)[0])
            meta = consumer.raw.list_topics(topic, timeout=10).topics.get(topic)
            if meta is not None and meta.error is None:
                parts += [TopicPartition(topic, p, 0) for p in meta.partitions]
        consumer.assign(parts)
        try:
            while not self._stop.is_set():
                record = consumer.poll(0.5)
                if record is not None:
                    self.add(record.event)
        finally:
            consumer.close()

    def add(self, e: Any) -> None:
        with self._lock:
            self.counts[type(e).__name__] = self.counts.get(type(e).__name__, 0) + 1
            at = e.occurred_at.isoformat()
            if isinstance(e, (TurnRecorded, FeedbackReceived, RewardJudged, SampleReady)):
                s = self.sessions.setdefault(e.session_id, {
                    "session_id": e.session_id, "tenant": e.tenant, "turns": 0, "feedback": 0,
                    "rewards": [], "samples": 0, "first_at": at, "last_at": at})
                s["last_at"] = max(s["last_at"], at)
                if isinstance(e, TurnRecorded):
                    s["turns"] += 1
                elif isinstance(e, FeedbackReceived):
                    s["feedback"] += 1
                elif isinstance(e, SampleReady):
                    s["samples"] += 1
                else:
                    s["rewards"].append(e.majority)
                    self.judgements.append({
                        "at": at, "session_id": e.session_id, "turn_index": e.turn_index,
                        "judge": e.judge, "majority": e.majority, "turn_id": e.turn_id,
                        "votes": [v.score for v in e.votes]})
            elif isinstance(e, CheckpointPublished):
                self.checkpoints.append({"at": at, "run": e.run, "version": e.version,
                                         "kind": e.kind.value, "step": e.step,
                                         "samples_trained": e.samples_trained, "metrics": e.metrics})
            elif isinstance(e, DeadLettered):
                self.dead_letters.append({"at": at, "stage": e.stage, "source": f"{e.source_topic}"
                                          f"[{e.source_partition}]@{e.source_offset}", "error": e.error[:300]})

    def summary(self) -> dict[str, Any]:
        with self._lock:
            sessions = sorted(self.sessions.values(), key=lambda s: s["last_at"], reverse=True)
            return {
                "namespace": self.namespace or self.settings.kafka.namespace,
                "counts": dict(self.counts),
                "sessions": [{**s, "reward_mean": (sum(s["rewards"]) / len(s["rewards"]))
                              if s["rewards"] else None, "rewards": len(s["rewards"])}
                             for s in sessions[:200]],
                "judgements": list(self.judgements)[-500:],
                "checkpoints": list(self.checkpoints),
                "dead_letters": list(self.dead_letters),
            }


def _tenant(request: Request) -> str:
    keyring = request.app.state.ops_keyring
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    key = None
    if scheme.lower() == "bearer":
        key = value.strip()
    elif scheme.lower() == "basic":
        try:
            key = base64.b64decode(value).decode().partition(":")[2]
        except ValueError:
            key = None
    tenant = keyring.tenant_for(key)
    if tenant is None:
        raise HTTPException(401, "a valid API key is required (Bearer, or Basic with the key as password)",
                            headers={"WWW-Authenticate": 'Basic realm="nextstate ops"'})
    return tenant


def ops_router() -> APIRouter:
    """Routes under /ops; the app must set `state.ops_index` and `state.ops_keyring`."""
    router = APIRouter(prefix="/ops", dependencies=[Depends(_tenant)])

    @router.get("/api/summary")
    def summary(request: Request) -> dict[str, Any]:
        return request.app.state.ops_index.summary()

    @router.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    return router


@contextmanager
def _following(app: Any, settings: Settings, namespace: str | None) -> Iterator[None]:
    app.state.ops_index = OpsIndex(settings, namespace).start()
    try:
        yield
    finally:
        app.state.ops_index.stop()


def mount(settings: Settings, namespace: str | None = None) -> Callable[[Any], Any]:
    """For the gateway's `create_app(mount=...)`: the ops view under /ops of the gateway app,
    behind the gateway's own keys, its index following the log while the app serves."""

    def on(app: Any) -> Any:
        app.state.ops_keyring = app.state.gateway.keys
        app.include_router(ops_router())
        return _following(app, settings, namespace)

    return on


def ops_app(settings: Settings, namespace: str | None = None):
    """A standalone app serving only the ops view (`nextstate ops`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from producers.gateway.auth import KeyRing

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with _following(app, settings, namespace):
            yield

    app = FastAPI(title="nextstate ops", lifespan=lifespan)
    app.state.ops_keyring = KeyRing.from_settings(settings.gateway, settings.profile == "local")
    app.include_router(ops_router())
    return app
