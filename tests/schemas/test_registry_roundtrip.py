"""Every event through the real schema registry and the real broker, and back, unchanged;
and what a consumer does with bytes that are not an event."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from infra.errors import DecodeError
from infra.kafka import EventConsumer, EventProducer, OnDecodeError
from schemas.catalog import TOPICS
from schemas.events import DeadLettered
from tests.conftest import drain
from tests.schemas.examples import examples

pytestmark = pytest.mark.stack


def test_every_event_round_trips_through_registry_and_broker(settings, registry, namespace):
    events = examples()
    producer = EventProducer(settings.kafka, registry, namespace)
    for event in events.values():
        producer.send(event, key="s-1")
    producer.flush()

    consumer = EventConsumer(settings.kafka, registry, f"g-{uuid.uuid4().hex}", namespace)
    consumer.subscribe(TOPICS)
    records = drain(consumer, len(events))
    consumer.close()

    by_type = {type(r.event).__name__: r for r in records}
    assert set(by_type) == set(events)
    for name, event in events.items():
        assert by_type[name].event == event, name
        assert by_type[name].key == b"s-1"
        assert by_type[name].topic == f"{namespace}{TOPICS[name]}"


def test_wire_format_is_confluent_with_registered_id(settings, registry, namespace):
    producer = EventProducer(settings.kafka, registry, namespace)
    turn = examples()["TurnRecorded"]
    wire = producer.serde("TurnRecorded").serialize(turn)
    assert wire[0] == 0  # magic byte
    schema_id = int.from_bytes(wire[1:5], "big")
    registered = registry.get_latest_version(f"{namespace}turns-value")
    assert registered.schema_id == schema_id
    assert registry.get_compatibility(f"{namespace}turns-value") == "BACKWARD"


def test_garbage_bytes_raise_an_error_naming_where(settings, registry, namespace):
    producer = EventProducer(settings.kafka, registry, namespace)
    topic = producer.topic("TurnRecorded")
    producer.send_raw(topic, b"\x07not avro at all", key="s-x")
    producer.flush()

    consumer = EventConsumer(settings.kafka, registry, f"g-{uuid.uuid4().hex}", namespace)
    consumer.subscribe(["TurnRecorded"])
    with pytest.raises(DecodeError) as err:
        drain(consumer, 1, timeout=30)
    consumer.close()
    message = str(err.value)
    assert topic in message and "@0" in message
    assert err.value.topic == topic and err.value.offset == 0 and err.value.partition >= 0
    assert "magic byte" in message.lower() or "unknown" in message.lower()


def test_dead_letter_policy_keeps_the_raw_record_and_moves_on(settings, registry, namespace):
    producer = EventProducer(settings.kafka, registry, namespace)
    topic = producer.topic("FeedbackReceived")
    good = examples("s-dl")["FeedbackReceived"]
    # Same key, so both land in one partition, bad one first.
    producer.send_raw(topic, b"\x00\x00\x00\x00\x01truncated", key="s-dl")
    producer.send(good, key="s-dl")
    producer.flush()

    group = f"g-{uuid.uuid4().hex}"
    consumer = EventConsumer(settings.kafka, registry, group, namespace,
                             on_decode_error=OnDecodeError.DEAD_LETTER, dead_letters=producer,
                             stage="test")
    consumer.subscribe(["FeedbackReceived"])
    records = drain(consumer, 1)
    consumer.commit(records)
    consumer.close()
    assert [r.event for r in records] == [good]
    assert consumer.dead_lettered == 1

    dl = EventConsumer(settings.kafka, registry, f"g-{uuid.uuid4().hex}", namespace)
    dl.subscribe(["DeadLettered"])
    dead = drain(dl, 1)
    dl.close()
    assert len(dead) == 1
    event = dead[0].event
    assert isinstance(event, DeadLettered)
    assert event.source_topic == topic and event.source_offset == 0
    assert event.value == b"\x00\x00\x00\x00\x01truncated" and event.key == b"s-dl"
    assert event.stage == "test" and event.error

    # A restart of the same group starts after both: the bad record is not re-read.
    raw = Consumer({**settings.kafka.client_config(), "group.id": group})
    committed = raw.committed([TopicPartition(topic, records[0].partition)], timeout=10)
    raw.close()
    assert committed[0].offset == records[0].offset + 1


def test_a_shared_topic_tells_its_events_apart_by_schema_id_and_refuses_strangers(settings, registry, namespace):
    from schemas.errors import DecodeError
    from schemas.serde import TopicSerde, subject_for

    topic = f"{namespace}episodes"
    events = examples()
    producer = EventProducer(settings.kafka, registry, namespace)
    started, ended = (producer.serde(n).serialize(events[n]) for n in ("EpisodeStarted", "EpisodeEnded"))
    decoder = TopicSerde(registry, topic, "episodes")
    assert decoder.deserialize(started) == events["EpisodeStarted"]
    assert decoder.deserialize(ended) == events["EpisodeEnded"]
    assert subject_for(topic, "EpisodeEnded") == f"{topic}-nextstate.events.EpisodeEnded"
    stranger = producer.serde("TurnRecorded").serialize(events["TurnRecorded"])
    with pytest.raises(DecodeError, match="is a TurnRecorded, not one of"):
        decoder.deserialize(stranger, 0, 7)
