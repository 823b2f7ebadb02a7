"""Replay: re-run one stage over a slice of a live namespace's history into another namespace.

    nextstate replay judge --namespace rejudge-2026w47. --from 2026-11-14T00:00 --to 2026-11-21T00:00

1. The target namespace is provisioned (topics and schemas, ``infra.provision``).
2. For each input topic of the stage (processors.topology) in the *source* namespace,
   every partition is read from ``--from`` to ``--to`` (an offset, or an ISO-8601 time resolved
   with ``offsets_for_times``; default: the beginning and the current end) by a consumer that
   is assigned partitions and never commits, so the live topics and groups are untouched.
3. Records are merged in timestamp order (per partition the order is the log's order) and fed
   to the *same* handler the faust agent uses (the stage spec's ``handler``), with state in a
   dict instead of a changelog table; outputs and dead letters go to the target namespace, to
   the source record's partition. ``--copy-inputs`` also copies the slice into the target's
   input topics, so later stages can run there on their own.

Replay is a bounded batch streamed through memory (``SliceReader``: a few hundred records per
partition at a time), the idle-timeout scan does not run, and turns still pending at the end
are reported, not closed. Output ids are derived from their parents, so replaying twice gives the same ids.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from dataclasses import dataclass, field

from confluent_kafka import Consumer, Producer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from infra.errors import DeliveryError
from infra.kafka import parse_position
from infra.provision import provision_schemas, provision_topics
from infra.settings import Settings
from processors.assemble import REVISION_PREFIX
from processors.runtime import Serdes, StageRunner
from processors.stage import Context
from processors.topology import stage as stage_spec


@dataclass
class ReplayReport:
    stage: str
    source: str
    target: str
    read: int = 0
    copied: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"replayed {self.stage}: {self.read} record(s) from {self.source!r} into {self.target!r}",
                 f"counts {self.counts}"]
        if self.copied:
            parts.append(f"copied {self.copied} input record(s)")
        if self.pending:
            parts.append(f"{self.pending} entr(ies) still pending at the end of the slice")
        return "; ".join(parts)


def _bound(consumer: Consumer, tp: TopicPartition, spec: str | None, default_high: bool) -> int:
    low, high = consumer.get_watermark_offsets(tp, timeout=10)
    where = parse_position(spec, "--to" if default_high else "--from") if spec is not None else None
    if where is None:
        return high if default_high else low
    if where in ("beginning", "end"):
        return low if where == "beginning" else high
    if isinstance(where, int):
        return min(max(where, low), high)
    found = consumer.offsets_for_times([TopicPartition(tp.topic, tp.partition, int(where.timestamp() * 1000))],
                                       timeout=10)[0]
    return high if found.offset < 0 else found.offset


class SliceReader:
    """Every record of `topics` in [start, end), merged by (timestamp, topic order, offset),
    streamed: per partition the log's order is kept, and a record is handed out only once
    every partition still open has one buffered, so the merge never guesses. A partition whose
    buffer holds `buffer_records` is paused until it drains: memory is bounded by the number
    of partitions, not by the length of the slice."""

    def __init__(self, settings: Settings, topics: list[str], start: str | None, end: str | None,
                 buffer_records: int = 500) -> None:
        self.topics, self.buffer_records = topics, buffer_records
        self.consumer = Consumer({**settings.kafka.client_config(), "group.id": f"replay-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "enable.partition.eof": True,
                                  "fetch.message.max.bytes": settings.kafka.max_message_bytes})
        self.ranges: dict[str, tuple[int, int]] = {}
        self.remaining: dict[tuple[str, int], int] = {}   # open partitions → end offset
        try:
            meta = self.consumer.list_topics(timeout=10).topics
            assign = []
            for topic in topics:
                if topic not in meta:
                    raise ValueError(f"source topic {topic!r} does not exist")
                for p in meta[topic].partitions:
                    tp = TopicPartition(topic, p)
                    lo, hi = _bound(self.consumer, tp, start, False), _bound(self.consumer, tp, end, True)
                    self.ranges[f"{topic}[{p}]"] = (lo, hi)
                    if hi > lo:
                        assign.append(TopicPartition(topic, p, lo))
                        self.remaining[(topic, p)] = hi
            self.consumer.assign(assign)
        except BaseException:
            self.consumer.close()
            raise
        self.total = sum(hi - lo for lo, hi in self.ranges.values())

    def __iter__(self):
        order = {t: i for i, t in enumerate(self.topics)}
        buffers: dict[tuple[str, int], deque] = {tp: deque() for tp in self.remaining}
        paused: set[tuple[str, int]] = set()
        try:
            while buffers:
                if any(not buf for buf in buffers.values()):
                    self._fill(buffers, paused)
                    continue
                tp = min(buffers, key=lambda k: (buffers[k][0].timestamp()[1], order[k[0]],
                                                 buffers[k][0].offset()))
                msg = buffers[tp].popleft()
                if not buffers[tp] and tp not in self.remaining:
                    del buffers[tp]   # read to its end and handed out
                elif tp in paused and len(buffers[tp]) < self.buffer_records // 2:
                    self.consumer.resume([TopicPartition(*tp)])
                    paused.discard(tp)
                yield msg
        finally:
            self.consumer.close()

    def _fill(self, buffers: dict, paused: set) -> None:
        msg = self.consumer.poll(1.0)
        if msg is None:
            return
        tp = (msg.topic(), msg.partition())
        if msg.error() and msg.error().code() == -191:  # partition EOF: nothing left before the end
            if tp in self.remaining:
                del self.remaining[tp]
                if not buffers.get(tp, True):
                    del buffers[tp]
            return
        if msg.error():
            raise ValueError(f"reading {msg.topic()}[{msg.partition()}]: {msg.error()}")
        if tp not in self.remaining or msg.offset() >= self.remaining[tp]:
            return
        buffers[tp].append(msg)
        if msg.offset() + 1 >= self.remaining[tp]:
            del self.remaining[tp]
        elif len(buffers[tp]) >= self.buffer_records and tp not in paused:
            self.consumer.pause([TopicPartition(*tp)])
            paused.add(tp)


def run_replay(settings: Settings, stage: str, source: str, target: str, start: str | None = None,
               end: str | None = None, copy_inputs: bool = False, console: Console | None = None,
               teacher=None) -> ReplayReport:
    spec = stage_spec(stage)
    if source == target:
        raise ValueError(f"replay target namespace {target!r} must differ from the source")
    provision_topics(settings.kafka, target)
    provision_schemas(settings.kafka, settings.registry, target)
    src, dst = Serdes(settings, source), Serdes(settings, target)
    inputs = [src.topics[e] for e in spec.inputs]
    report = ReplayReport(stage, source, target)
    records = SliceReader(settings, inputs, start, end)
    report.ranges = records.ranges
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5, "message.max.bytes": settings.kafka.max_message_bytes})
    errors: list[str] = []

    def delivered(err, msg) -> None:
        if err is not None:
            errors.append(f"{msg.topic()}: {err}")

    def produce(topic: str, key: bytes | None, value: bytes, partition: int | None) -> None:
        while True:
            try:
                producer.produce(topic, value=value, key=key, partition=partition or 0,
                                 on_delivery=delivered)
                return
            except BufferError:
                producer.poll(0.5)

    async def send(topic: str, key: bytes | None, value: bytes, partition: int | None) -> None:
        produce(topic, key, value, partition)

    state: dict = {}
    # Decode with the source's serdes (the records' subjects), encode into the target's topics.
    runner = StageRunner(stage, spec.handler(Context(settings, state, teacher)), src, send)
    runner.serdes = _Crossed(src, dst)

    async def go(progress: Progress, task) -> None:
        for m in records:
            await runner.process(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                                 dict(m.headers() or []))
            if copy_inputs:
                produce(dst.topic_of_short(src.short[m.topic()]), m.key(), m.value(), m.partition())
                report.copied += 1
            producer.poll(0)
            report.read += 1
            progress.advance(task)

    with Progress(TextColumn(f"replay {stage}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console or Console(stderr=True)) as progress:
        task = progress.add_task(stage, total=records.total)
        asyncio.run(go(progress, task))
    if producer.flush(60):
        errors.append("records still undelivered after 60s")
    if errors:
        raise DeliveryError(f"replay of {stage} into {target!r}: " + "; ".join(errors[:5]))
    report.counts = dict(runner.counts)
    # assemble's revision entries (processors.assemble.Waiting) are not transitions left open
    report.pending = sum(1 for k, v in state.items()
                         if not (isinstance(v, dict) and v.get("done")) and not str(k).startswith(REVISION_PREFIX))
    return report


@dataclass
class _Crossed:
    """Serdes that decode by source topic and encode into the target namespace."""

    src: Serdes
    dst: Serdes

    @property
    def topics(self) -> dict[str, str]:
        return self.dst.topics

    def decode(self, topic, value, partition, offset):
        return self.src.decode(topic, value, partition, offset)

    def encode(self, event):
        return self.dst.encode(event)
