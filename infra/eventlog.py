"""A namespace's whole event log, read once: every decodable event of every topic, from the
beginning to each partition's end at call time, with where it sits (topic, partition, offset).

The log is the database: the audit trail, the ops view, the demo's progress checks and the
reward comparison all read it this way. Records that do not decode are skipped here (they are
the dead-letter view's business). Knows nothing about what the events mean.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from confluent_kafka import TopicPartition

from infra.kafka import EventConsumer, OnDecodeError
from infra.settings import Settings
from schemas.catalog import TOPICS, events_on
from schemas.events import Event
from schemas.serde import registry_client


@dataclass(frozen=True)
class Logged:
    event: Event
    topic: str
    partition: int
    offset: int


def read_log(settings: Settings, namespace: str | None = None, timeout: float = 30.0) -> list[Logged]:
    """Every decodable event of the namespace, up to each partition's end at call time."""
    consumer = EventConsumer(settings.kafka, registry_client(settings.registry),
                             f"audit-{uuid.uuid4().hex}", namespace,
                             on_decode_error=OnDecodeError.SKIP)
    raw = consumer.raw
    ends: dict[tuple[str, int], int] = {}
    assignment = []
    for short in dict.fromkeys(TOPICS.values()):   # a topic once, even when it carries several events
        topic = consumer.topic(events_on(short)[0])
        meta = raw.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            continue
        for p in meta.partitions:
            low, high = raw.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                ends[(topic, p)] = high
                assignment.append(TopicPartition(topic, p, low))
    consumer.assign(assignment)
    out: list[Logged] = []
    done: set[tuple[str, int]] = set()
    while len(done) < len(ends):
        msg = raw.poll(timeout)
        if msg is None:
            break  # nothing more within the timeout: report what arrived
        if msg.error():
            continue
        where = (msg.topic(), msg.partition())
        try:
            out.append(Logged(consumer.decode(msg), *where, msg.offset()))
        except Exception:
            pass  # undecodable records are the dead-letter view's business
        if msg.offset() + 1 >= ends[where]:
            done.add(where)
    consumer.close()
    return out
