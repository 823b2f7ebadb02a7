"""Audit lineage: from a sample, turn, or session back to votes, hint and checkpoint."""

from __future__ import annotations

import pytest
from rich.console import Console

from infra.cli.audit import lineage, render, resolve
from infra.eventlog import Logged, read_log
from infra.kafka import EventProducer
from schemas.events import PartitionOffset
from tests.schemas.examples import examples


def _log(ns: str = "n.") -> tuple[list[Logged], dict]:
    ex = examples()
    log = [Logged(e, f"{ns}{name}", 0, i) for i, (name, e) in enumerate(ex.items())]
    sample = next(item for item in log if item.event is ex["SampleReady"])
    before = ex["CheckpointPublished"].model_copy(update={
        "version": 1, "consumed_offsets": [PartitionOffset(topic=sample.topic, partition=0, offset=sample.offset)]})
    after = ex["CheckpointPublished"].model_copy(update={
        "version": 2, "consumed_offsets": [PartitionOffset(topic=sample.topic, partition=0, offset=sample.offset + 1)]})
    later = after.model_copy(update={"version": 3})
    log += [Logged(c, f"{ns}checkpoints", 0, 100 + i) for i, c in enumerate((before, later, after))]
    return log, ex


def test_lineage_from_a_sample_walks_back_to_votes_hint_and_checkpoint():
    log, ex = _log()
    [turn_id] = resolve(log, ex["SampleReady"].event_id)
    assert turn_id == ex["TurnRecorded"].event_id
    lin = lineage(log, turn_id)
    assert lin.turn == ex["TurnRecorded"]
    assert lin.transition == ex["TransitionFormed"]
    assert [j.votes[0].raw_text for j in lin.judgements] == ["\\boxed{-1}"]
    assert lin.hints[0].accepted_hint == "check the permissions first"
    assert [s.event for s in lin.samples] == [ex["SampleReady"]]
    # The first checkpoint of the run whose consumed offset passes the sample: v2, not v1 or v3.
    assert [c.version for c in lin.checkpoints] == [2]


def test_resolve_by_session_and_judgement():
    log, ex = _log()
    assert resolve(log, "s-1") == [ex["TurnRecorded"].event_id]
    assert resolve(log, ex["RewardJudged"].event_id) == [ex["TurnRecorded"].event_id]
    assert resolve(log, "no-such-id") == []


def test_render_prints_the_whole_story():
    log, ex = _log()
    own = ex["SampleReady"]
    answer = own.model_copy(update={"event_id": "answer-1", "parent_ids": [*own.parent_ids, own.event_id],
                                    "normaliser": "teacher", "revision_of": own.event_id, "advantage": 1.0})
    log.append(Logged(answer, "n.samples", 0, 99))
    console = Console(record=True, width=200)
    render(lineage(log, ex["TurnRecorded"].event_id), console)
    text = console.export_text()
    for needle in ("ls -la", "permission denied", "majority -1", "check the permissions first",
                   "COMBINED", "checkpoint main v2", "the teacher's own answer: 2 tokens",
                   f"the teacher's own answer beside {own.event_id}, advantage +1.000"):
        assert needle in text, needle


@pytest.mark.stack
def test_read_log_reads_a_real_namespace(settings, registry, namespace):
    ex = examples("s-audit")
    producer = EventProducer(settings.kafka, registry, namespace)
    for e in ex.values():
        producer.send(e, key="s-audit")
    producer.flush()
    log = read_log(settings, namespace)
    assert {type(i.event).__name__ for i in log} == set(ex)
    lin = lineage(log, ex["TurnRecorded"].event_id)
    assert lin.judgements and lin.hints and lin.samples
