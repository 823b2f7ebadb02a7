"""Assembling and running a gateway: from settings to a served uvicorn app.

`build_gateway` wires the parts (keys, spool, drainer with a Kafka producer factory, tracker)
around an engine and its tokenizer; `run_gateway` serves it in the foreground (what
`nextstate gateway` calls); `ServerThread` serves it on a background thread and a free port
(tests and the benchmark). Engines are created by the caller (`serving.create_engine`).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from infra import heap
from infra.settings import Settings
from producers.gateway.app import create_app
from producers.gateway.auth import KeyRing
from producers.gateway.service import Gateway
from producers.gateway.spool import Spool, SpoolDrainer
from serving.engine import Engine


def kafka_producer_factory(settings: Settings, namespace: str | None = None,
                           bootstrap_servers: str | None = None) -> Callable[[], Any]:
    """A factory of EventProducers for the drainer; each call connects afresh."""
    from infra.kafka import EventProducer
    from schemas.serde import registry_client

    kafka = settings.kafka
    if bootstrap_servers is not None:
        kafka = kafka.model_copy(update={"bootstrap_servers": bootstrap_servers})
    timeout_ms = int(settings.gateway.delivery_timeout_s * 1000)

    def make() -> EventProducer:
        return EventProducer(kafka, registry_client(settings.registry), namespace,
                             **{"message.timeout.ms": timeout_ms, "socket.timeout.ms": min(timeout_ms, 60000)})

    return make


def build_gateway(settings: Settings, engine: Engine, tokenizer: Any, namespace: str | None = None,
                  producer_factory: Callable[[], Any] | None = None, drain: bool = True,
                  keys: KeyRing | None = None) -> Gateway:
    gw_settings = settings.gateway
    spool = Spool(gw_settings.spool_dir, gw_settings.spool_segment_bytes)
    drainer = None
    if drain:
        factory = producer_factory or kafka_producer_factory(settings, namespace)
        # flush waits a little longer than librdkafka's own message timeout, so a failed
        # attempt leaves nothing queued in the old producer when a new one takes over.
        drainer = SpoolDrainer(spool, factory, flush_timeout_s=gw_settings.delivery_timeout_s + 5)
    keys = keys or KeyRing.from_settings(gw_settings, local=settings.profile.value == "local")
    return Gateway(gw_settings, engine, tokenizer, spool, keys, drainer)


def load_tokenizer(engine: Engine, serving: Any) -> Any:
    """The tokenizer of the model the engine serves (its chat template renders prompts)."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    from serving.models import resolve_model

    path = engine.info().details.get("tokenizer") or resolve_model(serving.model, serving.cache_dir)
    return AutoTokenizer.from_pretrained(path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class GatewayServer(uvicorn.Server):
    """uvicorn with the gateway's shutdown: when it stops (a signal, or `should_exit`), the
    gateway refuses new turns at once and ends the ones still running after
    ``gateway.shutdown_grace_s`` with a clear 503 (Gateway.begin_drain); uvicorn's own deadline
    a few seconds later only backs that up. Then the lifespan flushes the spool."""

    def __init__(self, config: uvicorn.Config, gw: Gateway) -> None:
        super().__init__(config)
        self.gw = gw

    async def shutdown(self, sockets: Any = None) -> None:
        self.gw.begin_drain(self.gw.settings.shutdown_grace_s)
        await super().shutdown(sockets)


def server_config(app: Any, gw: Gateway, host: str, port: int, log_level: str, **kw: Any) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_keep_alive=gw.settings.keep_alive_timeout_s,
                          timeout_graceful_shutdown=gw.settings.shutdown_grace_s + 5, **kw)


def run_gateway(gw: Gateway, host: str, port: int, log_level: str = "info", settings: Settings | None = None,
                namespace: str | None = None, reload: bool = False, mount: Callable[..., Any] | None = None) -> None:
    try:
        app = create_app(gw, settings, namespace, reload=reload, mount=mount)
        heap.freeze()   # the engine and tokenizer are loaded: collections skip them (infra.heap)
        GatewayServer(server_config(app, gw, host, port, log_level), gw).run()
    finally:
        gw.spool.close()


class ServerThread:
    """A gateway served by uvicorn on a background thread, for tests and benchmarks."""

    def __init__(self, gw: Gateway, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.gw, self.host, self.port = gw, host, port or free_port(host)
        config = server_config(create_app(gw), gw, self.host, self.port, "warning", lifespan="on")
        self.server = GatewayServer(config, gw)
        self.thread = threading.Thread(target=self._run, name="gateway-server", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.server.serve())

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = 60.0
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("gateway server thread exited during start-up")
            self.thread.join(0.02)
            deadline -= 0.02
            if deadline <= 0:
                raise TimeoutError(f"gateway did not start on {self.url}")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
