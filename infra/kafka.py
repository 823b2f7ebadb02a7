"""Typed Kafka plumbing every part uses: an event producer and an event consumer.

The producer is idempotent with ``acks=all`` and surfaces every delivery error. The
consumer never auto-commits: the caller commits after its outputs are produced, and
chooses what happens to a record that cannot be decoded (raise, dead-letter, or skip).
Keys are session ids as UTF-8. Values are events serialized by ``schemas.serde``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from infra.errors import ConfigError, DecodeError, DeliveryError
from infra.settings import KafkaSettings
from schemas.catalog import TOPICS
from schemas.events import DeadLettered, Event
from schemas.serde import EventSerde, SchemaRegistryClient, TopicSerde


# What no retry will change: the record itself is refused (too large, malformed).
REFUSED_FOR_GOOD = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD,
    KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_MSG,
})


def refused_for_good(exc: BaseException) -> bool:
    """True if `exc` (from producing one record) says that record can never be delivered: its
    schema refuses it, or Kafka's error is about the record rather than the cluster."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from infra.errors import SchemaError

    if isinstance(exc, SchemaError):
        # the record does not fit its schema, or the registry refused the schema itself; not a
        # registry that is down or slow (that passes, and the record must wait for it)
        cause = exc.__cause__
        if isinstance(cause, SchemaRegistryError):
            return getattr(cause, "http_status_code", 0) in (409, 422)
        return isinstance(cause, (ValueError, TypeError, KeyError, OverflowError, AttributeError))
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0].code() in REFUSED_FOR_GOOD
    errors = getattr(exc, "kafka_errors", None)
    return bool(errors) and all(e.code() in REFUSED_FOR_GOOD for e in errors)


def ready_partitions(client: Any, topic: str, timeout: float = 10.0) -> list[int] | None:
    """The partitions of `topic` once the broker knows it and every partition has a leader;
    None if that is still not so after `timeout` s (the topic does not exist, or its leaders
    are not elected). `client` is anything with `list_topics` (consumer, producer, admin).

    A topic's creation is acknowledged by the controller before every broker's metadata has
    it, and right after a broker starts its leaders come a moment later: a part started just
    after provisioning would otherwise take a topic being set up for a missing one."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            meta = client.list_topics(topic, timeout=max(1.0, left)).topics.get(topic)
        except KafkaException:
            meta = None   # the broker did not answer in time: the same as not ready yet
        if (meta is not None and meta.error is None and meta.partitions
                and all(p.error is None and p.leader >= 0 for p in meta.partitions.values())):
            return sorted(meta.partitions)
        if left <= 0:
            return None
        time.sleep(min(0.2, max(left, 0.0)))


def topic_names(kafka: KafkaSettings, namespace: str | None = None) -> dict[str, str]:
    """Event name -> full topic name under the namespace."""
    return {event: kafka.topic(short, namespace) for event, short in TOPICS.items()}


class EventProducer:
    """Produces events to their topics; `flush()` raises if any record was not delivered."""

    def __init__(self, kafka: KafkaSettings, registry: SchemaRegistryClient,
                 namespace: str | None = None, **overrides: Any) -> None:
        conf = {
            **kafka.client_config(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.max.bytes": kafka.max_message_bytes,
            "client.id": f"nextstate-{socket.gethostname()}",
            **overrides,
        }
        self._producer = Producer(conf)
        self._registry = registry
        self._topics = topic_names(kafka, namespace)
        self._serdes: dict[str, EventSerde] = {}
        self._errors: list[str] = []
        self._kafka_errors: list[KafkaError] = []
        self.delivered = 0

    def serde(self, event_name: str) -> EventSerde:
        serde = self._serdes.get(event_name)
        if serde is None:
            serde = EventSerde(self._registry, event_name, self._topics[event_name])
            self._serdes[event_name] = serde
        return serde

    def topic(self, event_name: str) -> str:
        return self._topics[event_name]

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")
            self._kafka_errors.append(err)
        else:
            self.delivered += 1

    def send(self, event: Event, key: str | bytes | None = None,
             headers: dict[str, bytes] | None = None) -> None:
        """Queue `event` on its topic. Delivery is confirmed by `flush()`."""
        name = type(event).__name__
        value = self.serde(name).serialize(event)
        self.send_raw(self._topics[name], value, key, headers)

    def send_raw(self, topic: str, value: bytes | None, key: str | bytes | None = None,
                 headers: dict[str, bytes] | None = None) -> None:
        if isinstance(key, str):
            key = key.encode()
        while True:
            try:
                self._producer.produce(topic, value=value, key=key,
                                       headers=list((headers or {}).items()) or None,
                                       on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let librdkafka drain, then retry
                self._producer.poll(0.5)
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for every queued record; raise DeliveryError naming what failed."""
        remaining = self._producer.flush(timeout)
        errors, self._errors = self._errors, []
        kafka_errors, self._kafka_errors = self._kafka_errors, []
        if remaining:
            errors.append(f"{remaining} record(s) still undelivered after {timeout:.0f}s")
        if errors:
            exc = DeliveryError(f"{len(errors)} delivery failure(s): " + "; ".join(errors[:5]))
            exc.kafka_errors = kafka_errors   # what Kafka said about each, for callers that sort them
            raise exc
        return self.delivered

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)


class OnDecodeError(StrEnum):
    RAISE = "raise"            # stop: the caller decides
    DEAD_LETTER = "dead_letter"  # record it on dead-letters with the reason, keep going
    SKIP = "skip"              # count it, keep going (replays over known-bad history)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    event: Event

    @property
    def session_id(self) -> str | None:
        return self.key.decode() if self.key is not None else None


class EventConsumer:
    """Consumes events with manual commits and an explicit policy for undecodable records."""

    def __init__(self, kafka: KafkaSettings, registry: SchemaRegistryClient, group_id: str,
                 namespace: str | None = None,
                 on_decode_error: OnDecodeError = OnDecodeError.RAISE,
                 dead_letters: EventProducer | None = None, stage: str = "consumer",
                 **overrides: Any) -> None:
        if on_decode_error is OnDecodeError.DEAD_LETTER and dead_letters is None:
            raise ValueError("on_decode_error=dead_letter needs a dead_letters producer")
        conf = {
            **kafka.client_config(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "fetch.message.max.bytes": kafka.max_message_bytes,
            **overrides,
        }
        self._consumer = Consumer(conf)
        self._registry = registry
        self._topics = topic_names(kafka, namespace)
        self._short = {topic: TOPICS[name] for name, topic in self._topics.items()}
        self._serdes: dict[str, TopicSerde] = {}
        self.on_decode_error = on_decode_error
        self.dead_letters = dead_letters
        self.stage = stage
        self.skipped = 0
        self.dead_lettered = 0

    @property
    def raw(self) -> Consumer:
        return self._consumer

    def subscribe(self, event_names: Iterable[str]) -> None:
        self._consumer.subscribe(sorted({self._topics[name] for name in event_names}))

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._consumer.assign(partitions)

    def topic(self, event_name: str) -> str:
        return self._topics[event_name]

    def _serde(self, topic: str) -> TopicSerde:
        serde = self._serdes.get(topic)
        if serde is None:
            serde = TopicSerde(self._registry, topic, self._short[topic])
            self._serdes[topic] = serde
        return serde

    def decode(self, msg: Message) -> Event:
        return self._serde(msg.topic()).deserialize(msg.value(), msg.partition(), msg.offset())

    def poll(self, timeout: float = 1.0) -> Record | None:
        """The next decodable record, or None if none came within `timeout`."""
        msg = self._consumer.poll(timeout)
        if msg is None:
            return None
        if msg.error():
            if msg.error().retriable() or msg.error().code() == KafkaError._PARTITION_EOF:
                return None
            raise KafkaException(msg.error())
        try:
            event = self.decode(msg)
        except DecodeError as exc:
            self._handle_bad(msg, exc)
            return None
        return Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), event)

    def _handle_bad(self, msg: Message, exc: DecodeError) -> None:
        if self.on_decode_error is OnDecodeError.RAISE:
            raise exc
        if self.on_decode_error is OnDecodeError.DEAD_LETTER:
            dead_letter(self.dead_letters, self.stage, msg, exc)
            self.dead_letters.flush()
            self.dead_lettered += 1
        else:
            self.skipped += 1
        # The bad record is dealt with; move past it so a restart does not loop on it.
        self._consumer.commit(offsets=[TopicPartition(msg.topic(), msg.partition(),
                                                      msg.offset() + 1)], asynchronous=False)

    def commit(self, records: Iterable[Record] | None = None) -> None:
        """Synchronously commit the position after each given record (or the current one)."""
        if records is None:
            self._consumer.commit(asynchronous=False)
            return
        latest: dict[tuple[str, int], int] = {}
        for r in records:
            key = (r.topic, r.partition)
            latest[key] = max(latest.get(key, -1), r.offset + 1)
        if latest:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in latest.items()],
                asynchronous=False,
            )

    def close(self) -> None:
        self._consumer.close()


def parse_position(spec: str, flag: str = "--from") -> int | datetime | str:
    """Where to start or stop reading: 'beginning' | 'end' (also 'earliest' | 'latest') | an
    offset | an ISO-8601 time (naive times are UTC). `flag` names the option in the error."""
    spec = spec.strip()
    if spec in ("beginning", "earliest", "end", "latest"):
        return {"earliest": "beginning", "latest": "end"}.get(spec, spec)
    if spec.isdigit():
        return int(spec)
    try:
        t = datetime.fromisoformat(spec)
    except ValueError:
        raise ConfigError(f"{flag} {spec!r} is neither beginning, end, an offset nor an ISO-8601 time") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def dead_letter(producer: EventProducer, stage: str, msg: Message, exc: BaseException) -> None:
    """Send the raw record to dead-letters with where it came from and why."""
    headers = {k: (v or b"") for k, v in (msg.headers() or [])}
    producer.send(DeadLettered.of(stage, msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                                    exc, headers), key=msg.key())
