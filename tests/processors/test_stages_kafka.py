"""The faust wiring against the real Kafka and schema registry: workers run as subprocesses
(`nextstate process ...`), tests produce events and read what comes out."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer

from infra.kafka import EventProducer
from schemas.events import DeadLettered, FeedbackKind, HintJudged, Method, RewardJudged, SampleReady, TransitionFormed
from tests.conftest import wait_for
from tests.processors.helpers import Collector, conversation, feedback, transition, turn

pytestmark = pytest.mark.stack


@pytest.fixture
def producer(settings, registry, namespace):
    p = EventProducer(settings.kafka, registry, namespace=namespace)
    yield p
    p.flush()


def raw_send(settings, topic: str, key: bytes, value: bytes) -> None:
    p = Producer({**settings.kafka.client_config(), "message.max.bytes": settings.kafka.max_message_bytes})
    p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


@pytest.mark.slow
def test_sessionize_killed_mid_stream_loses_and_duplicates_nothing(settings, registry, namespace,
                                                                   producer, workers):
    sessions = {sid: conversation(sid, 4) for sid in (f"s{i}-{uuid.uuid4().hex[:6]}" for i in range(6))}
    out = Collector(settings, registry, namespace, "TransitionFormed")
    w = workers("sessionize")
    for turns in sessions.values():
        for t in turns[:2]:
            producer.send(t, key=t.session_id)
    producer.flush()
    # turn 0 of every session closed; turn 1 now exists only in the worker's table
    wait_for(lambda: len(out.unique(TransitionFormed)) >= len(sessions), 90, what=f"first transitions\n{w.tail()}")
    w.kill()
    for turns in sessions.values():
        for t in turns[2:]:
            producer.send(t, key=t.session_id)
        producer.send(feedback(turns[0].session_id, FeedbackKind.SESSION_END), key=turns[0].session_id)
    producer.flush()
    w2 = workers("sessionize")
    expected = {t.event_id for turns in sessions.values() for t in turns}
    index = {t.event_id: (t.session_id, t.turn_index) for turns in sessions.values() for t in turns}
    try:
        wait_for(lambda: {e.turn.event_id for e in out.events(TransitionFormed)} >= expected, 120)
    except AssertionError:
        missing = expected - {e.turn.event_id for e in out.events(TransitionFormed)}
        raise AssertionError(f"no transition for {sorted(index[m] for m in missing)}\n{w2.tail()}")
    got = out.unique(TransitionFormed)
    assert {e.turn.event_id for e in got.values()} == expected and len(got) == len(expected)
    for turns in sessions.values():
        by_turn = {e.turn.event_id: e for e in got.values()}
        for a, b in zip(turns, turns[1:]):
            assert by_turn[a.event_id].next_turn_event_id == b.event_id  # turn 1 survived the kill
        assert by_turn[turns[-1].event_id].next_state_kind.value == "SESSION_END"
    out.close()


def test_a_record_ahead_of_its_predecessors_rewinds_the_partition_and_nothing_is_lost(
        settings, registry, namespace, producer, tmp_path):
    """processors.order in a live faust worker: its expected offsets are moved back mid-stream
    (tests/processors/disturbed_worker.py), so the next records arrive ahead of records it
    has not seen; the partition is rewound, read again, and every turn closes exactly once."""
    import sys

    from tests.processors.helpers import StageProcess

    w = StageProcess("sessionize", namespace, tmp_path / "faust", tmp_path / "disturbed.log")
    w.args = [sys.executable, "-m", "tests.processors.disturbed_worker", namespace]
    sessions = {sid: conversation(sid, 4) for sid in (f"s{i}-{uuid.uuid4().hex[:6]}" for i in range(6))}
    out = Collector(settings, registry, namespace, "TransitionFormed")
    w.start()
    try:
        for turns in sessions.values():
            for t in turns[:2]:
                producer.send(t, key=t.session_id)
        producer.flush()
        wait_for(lambda: "DISTURBED" in w.tail(), 90, what=f"the disturbance\n{w.tail()}")
        for turns in sessions.values():
            for t in turns[2:]:
                producer.send(t, key=t.session_id)
            producer.send(feedback(turns[0].session_id, FeedbackKind.SESSION_END), key=turns[0].session_id)
        producer.flush()
        expected = {t.event_id for turns in sessions.values() for t in turns}
        wait_for(lambda: {e.turn.event_id for e in out.events(TransitionFormed)} >= expected, 120,
                 what=f"every turn closed\n{w.tail()}")
        assert "arrived before" in w.tail(20_000), w.tail()        # the rewind happened
        got = out.unique(TransitionFormed)
        assert {e.turn.event_id for e in got.values()} == expected and len(got) == len(expected)
        by_turn = {e.turn.event_id: e for e in got.values()}
        for turns in sessions.values():
            for a, b in zip(turns, turns[1:]):
                assert by_turn[a.event_id].next_turn_event_id == b.event_id   # in order
    finally:
        w.stop()
        out.close()


@pytest.mark.slow
def test_all_stages_turns_to_samples_with_teacher_and_dead_letters(settings, registry, namespace, producer,
                                                                   workers, tiny_model_dir):
    env = {"NEXTSTATE_PROCESSORS__METHOD": "combined", "NEXTSTATE_PROCESSORS__JUDGE": "feedback",
           "NEXTSTATE_PROCESSORS__HINT_JUDGE": "feedback", "NEXTSTATE_PROCESSORS__JUDGE_VOTES": "1",
           "NEXTSTATE_PROCESSORS__TEACHER_MODEL": str(tiny_model_dir),
           "NEXTSTATE_PROCESSORS__TEACHER_ANSWERS": "true"}
    turns_topic = f"{namespace}turns"
    transitions_topic = f"{namespace}transitions"
    # bad records first: the stages must dead-letter them and keep going
    raw_send(settings, turns_topic, b"bad", b"\x00garbage that is not avro")
    raw_send(settings, transitions_topic, b"bad", b"not even the magic byte")
    bad_turn = turn("bad-session", 0, [], n=4, response_logprobs=[-0.1] * 3)
    producer.send(bad_turn, key=bad_turn.session_id)

    def session(user_reply: str) -> list:
        sid = str(uuid.uuid4())
        t0 = turn(sid, 0, [{"role": "user", "content": "write hello"}], response="print(1)")
        msgs = [{"role": "user", "content": "write hello"}, {"role": "assistant", "content": "print(1)"},
                {"role": "user", "content": user_reply}]
        return [t0, turn(sid, 1, msgs, response="ok")]

    corrected, thanked, neutral = (session("No, I said print hello world instead"),
                                   session("perfect, thanks"), session("next task please"))
    for ts in (corrected, thanked, neutral):
        for t in ts:
            producer.send(t, key=t.session_id)
        producer.send(feedback(ts[0].session_id, FeedbackKind.SESSION_END), key=ts[0].session_id)
    producer.flush()
    out = Collector(settings, registry, namespace, "SampleReady", "DeadLettered", "RewardJudged", "HintJudged")
    for stage in ("sessionize", "judge", "hint", "assemble"):
        workers(stage, **env)
    # corrected: reward -1 + hint → COMBINED; thanked: +1, no hint → RL; neutral turn 0: nothing;
    # the last turns close on SESSION_END with no signal → nothing.
    want = {corrected[0].event_id: (Method.COMBINED, -1.0), thanked[0].event_id: (Method.RL, 1.0)}
    by_turn = lambda: {s.parent_ids[0]: s for s in out.events(SampleReady) if s.normaliser != "teacher"}
    answers = lambda: list({s.event_id: s for s in out.events(SampleReady) if s.normaliser == "teacher"}.values())
    wait_for(lambda: set(by_turn()) >= set(want) and answers() and len(out.unique(DeadLettered)) >= 5
             and len(out.unique(RewardJudged)) >= 6 and len(out.unique(HintJudged)) >= 6, 180,
             what="samples, judgements, hints and dead letters")
    samples = by_turn()
    assert {k: (s.method, s.reward) for k, s in samples.items()} == want
    combined = samples[corrected[0].event_id]
    assert len(combined.teacher_logprobs) == len(corrected[0].response_token_ids)
    assert combined.behaviour_logprobs == corrected[0].response_logprobs
    assert samples[thanked[0].event_id].teacher_logprobs is None
    hints = {h.turn_id: h for h in out.events(HintJudged)}
    assert hints[corrected[0].event_id].accepted_hint == "No, I said print hello world instead"
    assert hints[corrected[0].event_id].teacher_policy == "base"
    # the teacher's own answer under the hint: a sample in the corrected turn's context
    (answer,) = answers()
    assert answer.response_token_ids == hints[corrected[0].event_id].teacher_answer_ids
    assert answer.prompt_token_ids == corrected[0].prompt_token_ids and answer.revision_of == combined.event_id
    assert all(h.teacher_answer_ids is None for k, h in hints.items() if k != corrected[0].event_id)
    assert len(out.unique(RewardJudged)) == 6  # 3 sessions x 2 turns, each judged once
    dead = out.unique(DeadLettered)
    where = {(d.stage, d.source_topic) for d in dead.values()}
    assert where == {("sessionize", turns_topic), ("judge", transitions_topic), ("hint", transitions_topic),
                     ("assemble", transitions_topic)}
    by_stage = {(d.stage, d.value): d for d in dead.values()}
    assert by_stage[("sessionize", b"\x00garbage that is not avro")].error_type == "DecodeError"
    invalid = [d for d in dead.values() if d.error_type == "InvalidRecord"]
    assert len(invalid) == 1 and "4 response tokens but 3 logprobs" in invalid[0].error
    assert all(d.source_offset >= 0 and d.key is not None for d in dead.values())
    out.close()


def test_assemble_dead_letters_wrong_lengths_and_keeps_going(settings, registry, namespace, producer, workers):
    from tests.processors.test_assemble import hint, judgement

    good, bad = transition("x"), transition("y")
    for t, n in ((bad, 3), (good, 4)):
        producer.send(t, key=t.session_id)
        producer.send(judgement(t, 1), key=t.session_id)
        producer.send(hint(t, n=n), key=t.session_id)
    producer.flush()
    out = Collector(settings, registry, namespace, "SampleReady", "DeadLettered")
    workers("assemble", NEXTSTATE_PROCESSORS__METHOD="combined")
    wait_for(lambda: out.events(SampleReady) and out.events(DeadLettered), 90, what="sample and dead letter")
    (sample,) = out.events(SampleReady)
    (dead,) = out.events(DeadLettered)
    assert sample.session_id == good.session_id and sample.method is Method.COMBINED
    assert dead.stage == "assemble" and "4 response tokens but 3 teacher_logprobs" in dead.error
    # whichever side completed the join is the record that could not be used
    assert dead.source_topic in {f"{namespace}{t}" for t in ("transitions", "judgements", "hints")}
    assert dead.key == bad.session_id.encode() and dead.value and dead.source_offset >= 0
    out.close()


@pytest.mark.slow
def test_a_revision_is_formed_across_a_restart_of_assemble(settings, registry, namespace, producer, workers):
    """The approved redo is assembled first; assemble is killed; then the rejected answer's
    sample comes: the session's latest sample came back from the table's changelog, so the
    revision is sent, once, in the rejected answer's context."""
    from tests.processors.test_revisions import judged
    from tests.processors.test_revisions import transition as step

    s = f"s-{uuid.uuid4().hex[:6]}"
    t0, t1 = step(s, 0, [100, 101, 102]), step(s, 1, [200, 201])   # turn 1's prompt continues turn 0's
    out = Collector(settings, registry, namespace, "SampleReady")
    w = workers("assemble", NEXTSTATE_PROCESSORS__METHOD="rl")
    for e in (t1, judged(t1, 1)):
        producer.send(e, key=s)
    producer.flush()
    wait_for(lambda: out.events(SampleReady), 90, what=f"the redo's sample\n{w.tail()}")
    w.kill()
    for e in (t0, judged(t0, -1)):
        producer.send(e, key=s)
    producer.flush()
    w2 = workers("assemble", NEXTSTATE_PROCESSORS__METHOD="rl")
    wait_for(lambda: any(e.revision_of for e in out.events(SampleReady)), 90, what=f"the revision\n{w2.tail()}")
    got = out.unique(SampleReady)
    (rev,) = [e for e in got.values() if e.revision_of]
    first = next(e for e in got.values() if e.turn_index == 0 and not e.revision_of)
    assert rev.revision_of == first.event_id and first.reward == -1.0
    assert rev.prompt_token_ids == t0.turn.prompt_token_ids and rev.response_token_ids == [200, 201]
    assert len(got) == 3
    out.close()


def _garbage(settings, registry, namespace) -> dict[str, bytes]:
    """Four kinds of record no stage can use: random bytes, a schema id the registry never gave,
    a valid record of an event no stage reads (a checkpoint), and a huge record."""
    import os

    from schemas.events import CheckpointKind, CheckpointPublished
    from schemas.serde import EventSerde

    checkpoint = CheckpointPublished(run="r", version=1, kind=CheckpointKind.LORA, base_model="tiny",
                                     uri="s3://b/r/v00000001/", files=[], consumed_offsets=[], step=1,
                                     samples_trained=1)
    other = EventSerde(registry, "CheckpointPublished", f"{namespace}checkpoints").serialize(checkpoint)
    return {"random": b"\x07" + os.urandom(63), "unknown-schema": b"\x00" + (987654).to_bytes(4, "big") + b"\x02x",
            "other-event": other, "huge": b"\x00" + os.urandom(2 * 1024 * 1024)}


@pytest.mark.slow
def test_every_stage_dead_letters_every_kind_of_garbage_on_every_input_and_goes_on(
        settings, registry, namespace, producer, workers):
    from processors.topology import stage as stage_spec
    from schemas.catalog import TOPICS

    stages = ("sessionize", "judge", "hint", "assemble", "group")
    garbage = _garbage(settings, registry, namespace)
    inputs = {s: sorted({TOPICS[e] for e in stage_spec(s).inputs}) for s in stages}
    for topic in sorted({t for ts in inputs.values() for t in ts}):
        for kind, value in garbage.items():
            raw_send(settings, f"{namespace}{topic}", kind.encode(), value)
    # then a conversation the stages must still turn into samples
    sid = str(uuid.uuid4())
    t0 = turn(sid, 0, [{"role": "user", "content": "write hello"}], response="print(1)")
    t1 = turn(sid, 1, [{"role": "user", "content": "write hello"}, {"role": "assistant", "content": "print(1)"},
                       {"role": "user", "content": "perfect, thanks"}], response="ok")
    for event in (t0, t1, feedback(sid, FeedbackKind.SESSION_END)):
        producer.send(event, key=sid)
    producer.flush()
    out = Collector(settings, registry, namespace, "SampleReady", "DeadLettered")
    env = {"NEXTSTATE_PROCESSORS__METHOD": "rl", "NEXTSTATE_PROCESSORS__JUDGE": "feedback",
           "NEXTSTATE_PROCESSORS__HINT_JUDGE": "feedback", "NEXTSTATE_PROCESSORS__JUDGE_VOTES": "1"}
    for s in stages:
        workers(s, **env)
    want = {(s, f"{namespace}{t}", k.encode()) for s in stages for t in inputs[s] for k in garbage}
    seen = lambda: {(d.stage, d.source_topic, d.key) for d in out.unique(DeadLettered).values()}  # noqa: E731
    wait_for(lambda: seen() >= want and {s.parent_ids[0] for s in out.events(SampleReady)} >= {t0.event_id, t1.event_id},
             240, what=f"{len(want)} dead letters and the conversation's two samples")
    dead = out.unique(DeadLettered).values()
    assert {(d.stage, d.source_topic, d.key) for d in dead} == want      # each once, nothing else
    for d in dead:
        assert d.error_type == "DecodeError" and d.error, (d.stage, d.key, d.error)
        if d.key == b"other-event":
            assert "CheckpointPublished" in d.error or "schema" in d.error.lower(), d.error
    out.close()
