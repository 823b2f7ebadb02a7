"""The local stack against the real thing: Kafka, Apicurio Registry and MinIO as processes.

Uses the stack on the default ports and state dir (started once per session, left running).
The one test that needs a failing start uses its own state dir and free ports and never
touches the running stack. Waits on conditions, never on sleep.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator

import httpx
import pytest

from infra.errors import StackError
from infra.settings import Settings
from infra.stack import ServiceState, ServiceStatus, logs, status, up

pytestmark = pytest.mark.stack

SERVICES = {"kafka", "registry", "minio"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def foreign_listener() -> Iterator[int]:
    """A port held by a program that is not the stack (this test process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_status_shows_three_healthy_services(stack: list[ServiceStatus], settings: Settings) -> None:
    found = {s.name: s for s in status(settings.stack, settings.storage)}
    assert set(found) == SERVICES
    for s in found.values():
        assert s.state is ServiceState.HEALTHY, s
        assert s.pid is not None and s.pid > 0
    assert found["kafka"].version == settings.stack.kafka_version
    assert found["registry"].version == settings.stack.apicurio_version
    assert found["minio"].version == settings.stack.minio_release
    assert found["kafka"].address == f"127.0.0.1:{settings.stack.kafka_port}"
    assert found["registry"].address == settings.registry.url


def test_up_twice_keeps_the_same_processes(stack: list[ServiceStatus], settings: Settings) -> None:
    again = up(settings.stack, settings.storage)
    assert {s.name: s.pid for s in again} == {s.name: s.pid for s in stack}
    assert all(s.state is ServiceState.HEALTHY for s in again)


def test_port_held_by_another_program_is_reported(settings: Settings, foreign_listener: int, tmp_path) -> None:
    ports = {name: _free_port() for name in ("kafka_port", "controller_port", "registry_management_port",
                                              "minio_port", "minio_console_port")}
    mine = settings.stack.model_copy(update={"state_dir": tmp_path, "registry_port": foreign_listener, **ports})
    with pytest.raises(StackError) as raised:
        up(mine, settings.storage)
    message = str(raised.value)
    assert f"127.0.0.1:{foreign_listener}" in message
    assert "registry" in message and "another program" in message
    assert not any(f"127.0.0.1:{p}" in message for p in ports.values())
    assert not list(tmp_path.rglob("*.pid")), "nothing may be started when a port is taken"


def test_status_in_another_state_dir_sees_the_ports_as_foreign(stack: list[ServiceStatus], settings: Settings, tmp_path) -> None:
    elsewhere = settings.stack.model_copy(update={"state_dir": tmp_path})
    found = {s.name: s for s in status(elsewhere, settings.storage)}
    assert all(s.state is ServiceState.STOPPED for s in found.values())
    assert str(settings.stack.kafka_port) in found["kafka"].detail
    assert "another program" in found["kafka"].detail


def test_logs_returns_the_end_of_each_log(stack: list[ServiceStatus], settings: Settings) -> None:
    for name in SERVICES:
        lines = logs(settings.stack, name, 20)
        assert 0 < len(lines) <= 20, name
    assert logs(settings.stack, "kafka", 0) == []
    with pytest.raises(StackError, match="no service 'zookeeper'"):
        logs(settings.stack, "zookeeper")


def test_kafka_answers_metadata_with_single_node_settings(stack: list[ServiceStatus], settings: Settings) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient(settings.kafka.client_config())
    metadata = admin.list_topics(timeout=10)
    assert [(b.host, b.port) for b in metadata.brokers.values()] == [("127.0.0.1", settings.stack.kafka_port)]
    resource = ConfigResource(ConfigResource.Type.BROKER, str(next(iter(metadata.brokers))))
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert int(config["message.max.bytes"].value) == settings.kafka.max_message_bytes
    assert config["auto.create.topics.enable"].value == "false"


def test_registry_enforces_backward_compatibility(stack: list[ServiceStatus], settings: Settings) -> None:
    subject = f"test-stack-{uuid.uuid4().hex}-value"
    base = settings.registry.url
    headers = {"Content-Type": "application/vnd.schemaregistry.v1+json"}

    def schema(*extra: dict) -> dict:
        fields = [{"name": "a", "type": "string"}, *extra]
        return {"schema": json.dumps({"type": "record", "name": "T", "fields": fields})}

    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        try:
            assert client.post(f"/subjects/{subject}/versions", json=schema()).status_code == 200
            put = client.put(f"/config/{subject}", json={"compatibility": "BACKWARD"})
            assert put.status_code == 200, put.text
            assert client.get(f"/config/{subject}").json()["compatibilityLevel"] == "BACKWARD"
            # A new field without a default cannot read old data: refused.
            bad = client.post(f"/subjects/{subject}/versions", json=schema({"name": "b", "type": "int"}))
            assert bad.status_code == 409, bad.text
            good = client.post(f"/subjects/{subject}/versions",
                               json=schema({"name": "b", "type": "int", "default": 0}))
            assert good.status_code == 200, good.text
            assert client.get(f"/subjects/{subject}/versions").json() == [1, 2]
        finally:
            client.delete(f"/subjects/{subject}")


def test_minio_accepts_the_configured_credentials(stack: list[ServiceStatus], settings: Settings) -> None:
    from minio import Minio

    storage = settings.storage
    client = Minio(storage.endpoint, access_key=storage.access_key,
                   secret_key=storage.secret_key.get_secret_value(), secure=storage.secure)
    bucket = f"test-stack-{uuid.uuid4().hex[:12]}"
    client.make_bucket(bucket)
    try:
        assert client.bucket_exists(bucket)
    finally:
        client.remove_bucket(bucket)
