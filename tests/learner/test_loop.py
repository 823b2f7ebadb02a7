"""The learner loop in-process on the real stack: an untrainable sample goes to dead-letters
with its reason and training goes on; an offline rerun (`--from`) is a separate run with its
own checkpoints and objects that leaves the live run untouched; metrics reach the JSONL file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from confluent_kafka import TopicPartition

from infra.kafka import EventConsumer, EventProducer
from learner.loop import Until, learn, run_dir
from learner.metrics import read_metrics
from tests.learner.samples import make_sample
from tests.learner.test_resume import published, read_ledger, trained_ids

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def read_all(settings, registry, namespace, event_name):
    consumer = EventConsumer(settings.kafka, registry, group_id=f"read-{namespace}", namespace=namespace)
    topic = consumer.topic(event_name)
    meta = consumer.raw.list_topics(topic, timeout=10).topics[topic]
    ends = {p: consumer.raw.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in meta.partitions}
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    out, need = [], sum(ends.values())
    while len(out) < need:
        record = consumer.poll(1.0)
        if record is not None:
            out.append(record)
    consumer.close()
    return out


def test_invalid_sample_is_dead_lettered_and_a_rerun_from_an_offset_is_separate(
        settings, registry, namespace, bucket, tiny_model_dir, tmp_path):
    samples = [make_sample(i) for i in range(6)]
    broken = make_sample(99).model_copy(update={"behaviour_logprobs": [-1.0]})
    producer = EventProducer(settings.kafka, registry, namespace)
    for s in [*samples[:3], broken, *samples[3:]]:
        producer.send(s, key=s.session_id)
    producer.flush()
    ls = settings.learner.model_copy(update={
        "device": "cpu", "lora": True, "lora_rank": 4, "token_budget": 14, "method": "combined",
        "checkpoint_every_steps": 2, "fill_timeout_s": 0.2, "bucket": bucket, "work_dir": tmp_path})
    s = settings.model_copy(update={"learner": ls})

    live = learn(s, run="live", namespace=namespace, model=str(tiny_model_dir),
                 until=Until(stop_at_end=True))
    assert live.samples_trained == 6

    dead = [r.event for r in read_all(settings, registry, namespace, "DeadLettered")]
    assert len(dead) == 1 and dead[0].stage == "learner-live"   # the run that set it aside
    assert "has 3 response tokens but 1 behaviour_logprobs" in dead[0].error
    ledger = read_ledger(run_dir(ls.model_copy(update={"run": "live"}), namespace) / "ledger.jsonl")
    assert [i for line in ledger for i in line.get("invalid", [])] == [broken.event_id]
    assert sorted(i for line in ledger for i in trained_ids(line)) == sorted(x.event_id for x in samples)

    metrics = read_metrics(run_dir(ls.model_copy(update={"run": "live"}), namespace) / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    assert steps and all({"reward_mean", "clip_frac", "ratio_mean", "adv_std", "tokens_per_s",
                          "staleness"} <= m.keys() for m in steps)

    live_events = published(settings, registry, namespace, run="live")
    ends = {o.partition: o.offset for o in live_events[-1].consumed_offsets}
    assert sum(ends.values()) == 7   # the dead-lettered record is consumed too

    # A rerun on history from offset 1 of every partition: its own run, checkpoints, prefix.
    replay = learn(s, run="replay", namespace=namespace, start="1", model=str(tiny_model_dir),
                   until=Until(stop_at_end=True))
    expected = sum(max(0, n - 1) for n in ends.values())
    replay_ledger = read_ledger(run_dir(ls.model_copy(update={"run": "replay"}), namespace) / "ledger.jsonl")
    handled = [i for line in replay_ledger for k in ("train", "correct", "invalid")
               for i in line.get(k, [])]
    assert len(handled) == expected
    replay_events = published(settings, registry, namespace, run="replay")
    assert replay_events and replay_events[0].version == 1
    assert all("/replay/" in e.uri for e in replay_events)
    assert all("/live/" in e.uri for e in live_events)
    assert published(settings, registry, namespace, run="live") == live_events
    assert replay.samples_trained == len([i for line in replay_ledger for i in trained_ids(line)])


def idle_checkpointing(settings, bucket, work_dir):
    """Learner settings on the tiny model that publish only once the feed has been quiet."""
    return settings.learner.model_copy(update={
        "device": "cpu", "lora": True, "lora_rank": 4, "token_budget": 14, "method": "combined",
        "checkpoint_every_steps": 100, "checkpoint_every_s": 3600.0, "checkpoint_idle_s": 0.5,
        "fill_timeout_s": 0.2, "bucket": bucket, "work_dir": work_dir})


@contextmanager
def learning(settings, ls, run: str, namespace: str, model: str) -> Iterator[threading.Thread]:
    """`learn` with learner settings `ls` in a thread, stopped (and joined) when the block ends."""
    until = Until()
    runner = threading.Thread(target=learn, args=(settings.model_copy(update={"learner": ls}),), daemon=True,
                              kwargs={"run": run, "namespace": namespace, "model": model, "until": until})
    runner.start()
    try:
        yield runner
    finally:
        until.stop.set()
        runner.join(60)


def test_a_caught_up_learner_publishes_its_last_steps_without_waiting_for_more_samples(
        settings, registry, namespace, bucket, tiny_model_dir, tmp_path):
    from tests.conftest import wait_for

    samples = [make_sample(i) for i in range(3)]
    producer = EventProducer(settings.kafka, registry, namespace)
    for s in samples:
        producer.send(s, key=s.session_id)
    producer.flush()
    ls = idle_checkpointing(settings, bucket, tmp_path)
    with learning(settings, ls, "idle", namespace, str(tiny_model_dir)) as runner:
        # Neither 100 steps nor an hour: only the quiet feed can make this checkpoint.
        wait_for(lambda: published(settings, registry, namespace, run="idle"), 120, interval=1.0,
                 what="a checkpoint published while the learner keeps running")
        assert runner.is_alive()
        event = published(settings, registry, namespace, run="idle")[0]
        assert event.version == 1 and sum(o.offset for o in event.consumed_offsets) == len(samples)


def test_garbage_on_the_samples_topic_is_dead_lettered_and_training_goes_on(
        settings, registry, namespace, bucket, tiny_model_dir, tmp_path):
    from tests.conftest import wait_for
    from tests.processors.test_stages_kafka import _garbage, raw_send

    samples = [make_sample(i) for i in range(3)]
    topic = f"{namespace}samples"
    garbage = _garbage(settings, registry, namespace)
    for kind, value in garbage.items():
        raw_send(settings, topic, kind.encode(), value)
    producer = EventProducer(settings.kafka, registry, namespace)
    for s in samples:
        producer.send(s, key=s.session_id)
    producer.flush()
    ls = idle_checkpointing(settings, bucket, tmp_path)
    with learning(settings, ls, "junk", namespace, str(tiny_model_dir)):
        wait_for(lambda: published(settings, registry, namespace, run="junk"), 120, interval=1.0,
                 what="a checkpoint after the garbage")
        event = published(settings, registry, namespace, run="junk")[0]
        # the garbage is consumed too: the checkpoint's offsets are past every record
        assert sum(o.offset for o in event.consumed_offsets) == len(samples) + len(garbage)
        ledger = read_ledger(run_dir(ls.model_copy(update={"run": "junk"}), namespace) / "ledger.jsonl")
        assert {i for line in ledger for i in trained_ids(line)} == {s.event_id for s in samples}
    dead = [r.event for r in read_all(settings, registry, namespace, "DeadLettered")]
    assert sorted(d.key for d in dead) == sorted(k.encode() for k in garbage)
    assert all(d.stage.startswith("learner") and d.error_type == "DecodeError" for d in dead)
