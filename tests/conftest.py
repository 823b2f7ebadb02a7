"""Shared fixtures: the real local stack, started once per test session (or reused if it is
already up), and per-test namespaces and buckets so tests never see each other's data.

Tests wait on observable conditions (`wait_for`), never on fixed sleeps.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from infra.settings import Settings, load_settings

T = TypeVar("T")

# The hint stage's teacher defaults to the served model (the embedded SmolLM2 unless told); the
# tests that exercise a teacher name the tiny model, the others' stage workers load none.
os.environ.setdefault("NEXTSTATE_PROCESSORS__TEACHER_MODEL", "none")


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def drain(consumer, want: int, timeout: float = 60.0) -> list:
    """Poll an EventConsumer until `want` records arrived; fail after `timeout` seconds."""
    got: list = []

    def more() -> bool:
        record = consumer.poll(0.5)
        if record is not None:
            got.append(record)
        return len(got) >= want

    wait_for(more, timeout, interval=0, what=f"{want} records (got {len(got)})")
    return got


def poll_raw(consumer, want: int, timeout: float = 60.0) -> list:
    """Poll a plain confluent_kafka Consumer for `want` messages without errors."""
    got: list = []

    def more() -> bool:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            got.append(msg)
        return len(got) >= want

    wait_for(more, timeout, interval=0, what=f"{want} messages (got {len(got)})")
    return got


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[list[Any]]:
    """The real Kafka, schema registry and MinIO; started here unless already running."""
    from infra.stack import down, status, up

    def healthy() -> bool:
        return all(s.state == "healthy" for s in status(settings.stack, settings.storage))

    # polled for a few seconds: a health check that times out once under load must not make
    # this session think it started the stack, and take down one somebody else runs
    try:
        already = wait_for(healthy, timeout=3.0, interval=0.5, what="a running stack")
    except AssertionError:
        already = False
    statuses = up(settings.stack, settings.storage)
    yield statuses
    if not already:
        down(settings.stack, settings.storage)


@pytest.fixture(scope="session")
def registry(stack, settings: Settings):
    from schemas.serde import registry_client

    return registry_client(settings.registry)


@pytest.fixture
def namespace(stack, settings: Settings) -> Iterator[str]:
    """A fresh topic namespace with every topic and schema provisioned; deleted afterwards."""
    from infra.provision import admin_client, provision_schemas, provision_topics

    ns = f"t{uuid.uuid4().hex[:10]}."
    provision_topics(settings.kafka, ns)
    provision_schemas(settings.kafka, settings.registry, ns)
    yield ns
    admin = admin_client(settings.kafka)
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(ns)]
    if names:
        for fut in admin.delete_topics(names, operation_timeout=30).values():
            fut.result()


@pytest.fixture
def bucket(stack, settings: Settings) -> Iterator[str]:
    """A fresh, empty bucket in the real MinIO; removed with its objects afterwards."""
    from infra.storage import ensure_bucket, storage_client

    name = f"t-{uuid.uuid4().hex[:12]}"
    ensure_bucket(settings.storage, name)
    yield name
    client = storage_client(settings.storage)
    for obj in client.list_objects(name, recursive=True):
        client.remove_object(name, obj.object_name)
    client.remove_bucket(name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised Llama with a byte-level tokenizer (no download)."""
    from serving.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def workers(tmp_path, namespace):
    """Start `nextstate process <stage>` workers on the test's namespace; stopped at the end."""
    from tests.processors.helpers import StageProcess

    started: list[StageProcess] = []

    def start(stage: str, **env: str) -> StageProcess:
        w = StageProcess(stage, namespace, tmp_path / "faust", tmp_path / f"{stage}-{len(started)}.log", **env)
        started.append(w.start())
        return w

    yield start
    for w in started:
        w.stop()
