"""Provisioning against the real broker, registry and MinIO: every topic with its configs,
every subject under BACKWARD compatibility, the bucket; and all of it idempotent."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka.admin import ConfigResource

from confluent_kafka import Consumer

from infra.kafka import ready_partitions
from infra.provision import admin_client, provision
from infra.storage import storage_client
from schemas.catalog import TOPICS

pytestmark = pytest.mark.stack


def test_provision_creates_everything_and_is_idempotent(settings, registry, stack):
    ns = f"p{uuid.uuid4().hex[:8]}."
    bucket = f"p-{uuid.uuid4().hex[:10]}"
    admin = admin_client(settings.kafka)
    try:
        first = provision(settings.kafka, settings.registry, settings.storage, ns, bucket)
        assert set(first["topics"].values()) == {"created"}
        assert set(first["topics"]) == {f"{ns}{t}" for t in TOPICS.values()}
        assert first["bucket"] == {"name": bucket, "created": True}
        # provisioning returned only once every new topic was usable: a client that was not
        # part of it finds each one at once, every partition with a leader
        fresh = Consumer({**settings.kafka.client_config(), "group.id": f"p-{uuid.uuid4().hex[:8]}"})
        try:
            for name in first["topics"]:
                meta = fresh.list_topics(name, timeout=10).topics[name]
                assert meta.error is None and meta.partitions, name
                assert all(p.leader >= 0 for p in meta.partitions.values()), name
                assert ready_partitions(fresh, name, timeout=0) == sorted(meta.partitions)
            started = time.monotonic()
            assert ready_partitions(fresh, f"{ns}no-such-topic", timeout=1.5) is None
            assert 1.5 <= time.monotonic() - started < 10
        finally:
            fresh.close()

        again = provision(settings.kafka, settings.registry, settings.storage, ns, bucket)
        assert set(again["topics"].values()) == {"exists"}
        assert again["schemas"] == first["schemas"]  # same schema, same id: no new versions
        assert again["bucket"]["created"] is False

        meta = admin.list_topics(timeout=10).topics
        assert len(meta[f"{ns}samples"].partitions) == settings.kafka.partitions
        assert len(meta[f"{ns}checkpoints"].partitions) == 1
        resource = ConfigResource("topic", f"{ns}turns")
        config = admin.describe_configs([resource])[resource].result()
        assert config["retention.ms"].value == "-1"  # the event store keeps everything
        assert config["retention.bytes"].value == "-1"
        assert int(config["max.message.bytes"].value) == settings.kafka.max_message_bytes

        for subject in first["schemas"]:
            assert registry.get_compatibility(subject) == "BACKWARD"
        assert storage_client(settings.storage).bucket_exists(bucket)
    finally:
        names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(ns)]
        for fut in admin.delete_topics(names, operation_timeout=30).values():
            fut.result()
        storage_client(settings.storage).remove_bucket(bucket)
