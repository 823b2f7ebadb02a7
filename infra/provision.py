"""Provisioning: every topic of the event log, the schemas, and the checkpoint bucket.

The event topics are the event store, so by default nothing is deleted by time or size.
Control topics (raw timer requests of the stages, named by the caller from
processors.topology) are kept a day.
Provisioning is idempotent: existing topics are checked (partitions grown if asked for,
configs brought in line), existing subjects get the same schema back under BACKWARD
compatibility. A namespace other than the default provisions a separate set for replays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from infra.errors import StackError
from infra.kafka import ready_partitions
from infra.settings import KafkaSettings, RegistrySettings, StorageSettings
from infra.storage import ensure_bucket
from schemas.catalog import TOPICS, catalog
from schemas.serde import register, registry_client, subject_for

# Topics whose order across the whole topic matters get one partition.
SINGLE_PARTITION = {"checkpoints", "dead-letters"}


@dataclass(frozen=True)
class TopicPlan:
    name: str
    partitions: int
    config: dict[str, str]


def topic_plan(kafka: KafkaSettings, namespace: str | None = None) -> list[TopicPlan]:
    config = {
        "cleanup.policy": "delete",
        "retention.ms": str(kafka.retention_ms),
        "retention.bytes": "-1",
        "max.message.bytes": str(kafka.max_message_bytes),
        "min.insync.replicas": str(min(2, kafka.replication_factor)),
    }
    return [
        TopicPlan(kafka.topic(short, namespace),
                  1 if short in SINGLE_PARTITION else kafka.partitions, dict(config))
        for short in dict.fromkeys(TOPICS.values())   # a topic once, even when it carries several events
    ]


def control_plans(kafka: KafkaSettings, names: Sequence[str]) -> list[TopicPlan]:
    """Raw control topics (a stage's timer requests, processors.topology): never replayed, kept a day."""
    return [TopicPlan(name, kafka.partitions, {"retention.ms": str(24 * 3600 * 1000)}) for name in names]


def admin_client(kafka: KafkaSettings) -> AdminClient:
    return AdminClient(kafka.client_config())


def provision_topics(kafka: KafkaSettings, namespace: str | None = None, control: Sequence[str] = (),
                     timeout: float = 30.0) -> dict[str, str]:
    """Create or reconcile every event topic and the given control topics (full names);
    returns topic -> 'created' | 'exists'."""
    return ensure_topics(kafka, topic_plan(kafka, namespace) + control_plans(kafka, control), timeout)


def ensure_topics(kafka: KafkaSettings, plans: list[TopicPlan], timeout: float = 30.0) -> dict[str, str]:
    """Create the planned topics that are missing; grow and reconcile the ones that exist."""
    admin = admin_client(kafka)
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except Exception as exc:
        raise StackError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from exc
    result: dict[str, str] = {}
    new = [NewTopic(p.name, num_partitions=p.partitions,
                    replication_factor=kafka.replication_factor, config=p.config)
           for p in plans if p.name not in existing]
    for name, fut in (admin.create_topics(new, request_timeout=timeout) if new else {}).items():
        try:
            fut.result()
            result[name] = "created"
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise StackError(f"cannot create topic {name!r}: {exc}") from exc
            result[name] = "exists"
    # Created is not yet usable: provisioning returns once every new topic has its leaders, so
    # that a part started next finds it.
    for t in new:
        if ready_partitions(admin, t.topic, timeout) is None:
            raise StackError(f"topic {t.topic!r} was created but its partitions have no leader "
                             f"after {timeout:.0f} s; is the broker healthy?")
    grow, reconcile = [], []
    for p in plans:
        if p.name not in existing:
            continue
        result[p.name] = "exists"
        have = len(existing[p.name].partitions)
        if have < p.partitions:
            grow.append(NewPartitions(p.name, p.partitions))
        entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                   for k, v in p.config.items()]
        reconcile.append(ConfigResource("topic", p.name, incremental_configs=entries))
    for fut in (admin.create_partitions(grow, request_timeout=timeout) if grow else {}).values():
        fut.result()
    if reconcile:
        for res, fut in admin.incremental_alter_configs(reconcile, request_timeout=timeout).items():
            try:
                fut.result()
            except Exception as exc:
                raise StackError(f"cannot set config of {res.name!r}: {exc}") from exc
    return result


def provision_schemas(kafka: KafkaSettings, registry: RegistrySettings,
                      namespace: str | None = None) -> dict[str, int]:
    """Register every event schema under its topic's subject; subject -> schema id."""
    client = registry_client(registry)
    ids = {}
    for name, schema in catalog().items():
        topic = kafka.topic(TOPICS[name], namespace)
        ids[subject_for(topic, name)] = register(client, topic, schema, registry.compatibility)
    return ids


def provision(kafka: KafkaSettings, registry: RegistrySettings, storage: StorageSettings,
              namespace: str | None = None, bucket: str | None = None,
              control: Sequence[str] = ()) -> dict[str, object]:
    topics = provision_topics(kafka, namespace, control)
    schema_ids = provision_schemas(kafka, registry, namespace)
    created = ensure_bucket(storage, bucket)
    return {"topics": topics, "schemas": schema_ids,
            "bucket": {"name": bucket or storage.bucket, "created": created}}
