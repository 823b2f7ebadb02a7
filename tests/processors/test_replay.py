"""`nextstate replay`: a stage re-run over a slice of one namespace's history into another,
against the real Kafka; the live namespace's outputs stay untouched."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from confluent_kafka import Producer

from infra.kafka import EventProducer
from processors.replay import run_replay
from schemas.events import DeadLettered, RewardJudged, TransitionFormed
from tests.conftest import wait_for
from tests.processors.helpers import Collector, conversation, transition

pytestmark = pytest.mark.stack


def end_offsets(settings, topic: str) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**settings.kafka.client_config(), "group.id": f"wm-{uuid.uuid4().hex}"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in sorted(parts)]
    finally:
        c.close()


@pytest.fixture
def target(stack, settings):
    from infra.provision import admin_client

    ns = f"r{uuid.uuid4().hex[:10]}."
    yield ns
    admin = admin_client(settings.kafka)
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(ns)]
    for fut in admin.delete_topics(names, operation_timeout=30).values():
        fut.result()


def test_replay_judge_slice_into_another_namespace(settings, registry, namespace, target):
    p = EventProducer(settings.kafka, registry, namespace=namespace)
    first = [transition("thanks, perfect"), transition("no, that's wrong")]
    for t in first:
        p.send(t, key=t.session_id)
    raw = Producer(settings.kafka.client_config())
    raw.produce(f"{namespace}transitions", key=b"junk", value=b"\x00\x00\x00\x00\x01junk")
    assert raw.flush(30) == 0
    p.flush()
    boundary = datetime.now(timezone.utc)
    wait_for(lambda: datetime.now(timezone.utc).timestamp() * 1000 > boundary.timestamp() * 1000 + 2,
             what="the clock to move past the boundary")
    later = transition("great")
    p.send(later, key=later.session_id)
    p.flush()

    report = run_replay(settings, "judge", namespace, target, None, boundary.isoformat())
    assert report.read == 3 and report.counts["dead-lettered"] == 1
    out = Collector(settings, registry, target, "RewardJudged", "DeadLettered")
    wait_for(lambda: len(out.events(RewardJudged)) >= 2 and out.events(DeadLettered), 30, what="replayed judgements")
    got = {j.transition_id: j.majority for j in out.events(RewardJudged)}
    assert got == {first[0].event_id: 1, first[1].event_id: -1}   # `later` is past --to
    (dead,) = out.events(DeadLettered)
    assert dead.source_topic == f"{namespace}transitions" and dead.value == b"\x00\x00\x00\x00\x01junk"
    assert end_offsets(settings, f"{namespace}judgements") == [0, 0, 0]  # live topic untouched
    # the same replay again gives the same ids
    again = f"r{uuid.uuid4().hex[:10]}."
    try:
        run_replay(settings, "judge", namespace, again, None, boundary.isoformat())
        second = Collector(settings, registry, again, "RewardJudged")
        wait_for(lambda: len(second.events()) >= 2, 30, what="second replay")
        assert {j.event_id for j in second.events()} == {j.event_id for j in out.events(RewardJudged)}
    finally:
        from infra.provision import admin_client

        admin = admin_client(settings.kafka)
        names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(again)]
        for fut in admin.delete_topics(names, operation_timeout=30).values():
            fut.result()
    for c in (out, second):
        c.close()


def test_replay_sessionize_by_offsets_with_copied_inputs(settings, registry, namespace, target):
    p = EventProducer(settings.kafka, registry, namespace=namespace)
    turns = conversation(f"s-{uuid.uuid4().hex[:6]}", 3)
    for t in turns:
        p.send(t, key=t.session_id)
    p.flush()
    report = run_replay(settings, "sessionize", namespace, target, "0", None, copy_inputs=True)
    assert report.read == 3 and report.copied == 3 and report.pending == 1
    out = Collector(settings, registry, target, "TransitionFormed", "TurnRecorded")
    wait_for(lambda: len(out.events(TransitionFormed)) >= 2 and len(out.events()) >= 5, 30, what="replayed transitions")
    assert [t.turn.turn_index for t in sorted(out.events(TransitionFormed), key=lambda t: t.turn_index)] == [0, 1]
    assert {t.event_id for t in out.events() if not isinstance(t, TransitionFormed)} == {t.event_id for t in turns}
    with pytest.raises(ValueError, match="must differ"):
        run_replay(settings, "sessionize", namespace, namespace)
    out.close()


def test_slice_reader_streams_a_timestamp_merge_with_small_buffers(settings, namespace):
    from processors.replay import SliceReader

    topics = [f"{namespace}turns", f"{namespace}feedback"]
    raw = Producer(settings.kafka.client_config())
    base = 1_700_000_000_000
    sent = []
    for i in range(60):   # rising within each partition, interleaved across topics and partitions
        topic, partition, ts = topics[i % 2], i % 3, base + 3 * i + (i % 6) * 5 % 13
        raw.produce(topic, value=f"{i}".encode(), partition=partition, timestamp=ts)
        sent.append((ts, i % 2, f"{i}"))
    assert raw.flush(30) == 0
    reader = SliceReader(settings, topics, None, None, buffer_records=2)   # pauses partitions all the time
    assert reader.total == 60
    got = [(m.timestamp()[1], topics.index(m.topic()), m.value().decode()) for m in reader]
    assert sorted(v for _, _, v in got) == sorted(v for _, _, v in sent)
    keys = [(ts, t) for ts, t, _ in got]
    assert keys == sorted(keys)
