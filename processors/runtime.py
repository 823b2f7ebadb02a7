"""The generic faust agent body every stage shares: decode → step → send → then keep state.

Records come in batches (``processors.batch_max`` records or ``processors.batch_within_s``
seconds, whichever is first; topics are bytes in, bytes out; values are Confluent-wire Avro that
``schemas.serde.EventSerde`` decodes and encodes). For each record of a batch, in order:

1. decode it with the registry-bound serde of its topic;
2. call the stage's handler, which returns the events to send and, for stateful stages, a
   ``keep`` callback that writes the new state;
3. queue every output (to the source record's partition, key = session id) without waiting;
4. call ``keep``: it writes into ``StagedState``, an overlay over the stage's faust table, so the
   next record of the batch sees the new state while the table (and its changelog) does not yet.

Then, once per batch: **await the delivery of every queued output** (``producer_acks=-1``: all
in-sync replicas), and only then apply the overlay to the table. A crash before that re-sends
outputs with the same derived ids (downstream drops them) and never leaves state in the
changelog for outputs that were not delivered. Stateless stages that declare themselves
``concurrent`` handle the records of a batch side by side (``processors.stage_concurrency`` at
a time); their outputs are still queued in the records' order.

Why offsets are only committed after outputs and state are produced: faust acks the records of
a batch after the agent body returns from it (``Stream.take_events``); its consumer commits only
acked, gap-free offsets, and before every commit it flushes the producer
(``Consumer._commit_offsets`` awaits ``producer.flush()``), which also delivers the changelog
writes of the overlay. A killed worker therefore restarts from the last batch whose outputs and
state were both delivered. ``stream_wait_empty`` (on) lets a rebalance or shutdown finish the
batch in hand first. Per-record delivery waits cost a broker round trip each (measured: 40
turns/s through all stages against 1,182 raw); one wait per batch does not.

A record that cannot be decoded or used (``DecodeError``, ``InvalidRecord``, or any error in the
handler) becomes a ``DeadLettered`` event with its topic/partition/offset, raw key and value
and the error, and the stage goes on. ``JudgeUnavailable`` is retried with backoff instead:
the record is fine, the judge is not reachable. Knows nothing about any one stage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from infra.errors import SchemaError
from infra.kafka import topic_names
from infra.settings import Settings
from processors.dead_letters import dead_lettered
from processors.judges import JudgeUnavailable
from processors.stage import Handler, Result
from schemas.catalog import TOPICS
from schemas.events import Event
from schemas.serde import EventSerde, TopicSerde, registry_client

log = logging.getLogger("nextstate.processors")


class Serdes:
    """One registry-bound serde per topic of the namespace."""

    def __init__(self, settings: Settings, namespace: str) -> None:
        self.client = registry_client(settings.registry)
        self.topics = topic_names(settings.kafka, namespace)
        self.short = {topic: TOPICS[name] for name, topic in self.topics.items()}
        self._decoders: dict[str, TopicSerde] = {}
        self._encoders: dict[str, EventSerde] = {}

    def topic_of_short(self, short: str) -> str:
        return next(t for t, s in self.short.items() if s == short)

    def decode(self, topic: str, value: bytes | None, partition: int, offset: int) -> Event:
        decoder = self._decoders.get(topic)
        if decoder is None:
            decoder = self._decoders[topic] = TopicSerde(self.client, topic, self.short[topic])
        return decoder.deserialize(value, partition, offset)

    def encode(self, event: Event) -> tuple[str, bytes]:
        name = type(event).__name__
        encoder = self._encoders.get(name)
        if encoder is None:
            encoder = self._encoders[name] = EventSerde(self.client, name, self.topics[name])
        return encoder.topic, encoder.serialize(event)


_GONE = object()   # a key StagedState deleted


class StagedState(MutableMapping):
    """A stage's table with its writes held back: reads see them, the table gets them at `apply()`.

    The runner applies once the outputs of the records that made the writes are delivered, so
    the changelog never runs ahead of the outputs (see the module docstring). Each write
    remembers the partition of the record that made it (`partition`, set by the runner): a faust
    table sends it to that changelog partition (``processors.app.StageTable``)."""

    def __init__(self, table: MutableMapping) -> None:
        self.table = table
        self.partition: int | None = None
        self._writes: dict[Any, tuple[Any, int | None]] = {}

    def __getitem__(self, key: Any) -> Any:
        staged = self._writes.get(key)
        if staged is None:
            return self.table[key]
        if staged[0] is _GONE:
            raise KeyError(key)
        return staged[0]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._writes[key] = (value, self.partition)

    def __delitem__(self, key: Any) -> None:
        self[key]   # KeyError if it is not there
        self._writes[key] = (_GONE, self.partition)

    def __iter__(self) -> Iterator[Any]:
        for key in self.table:
            if key not in self._writes:
                yield key
        yield from (k for k, (v, _) in self._writes.items() if v is not _GONE)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def discard(self) -> None:
        """Forget the held writes (their batch's outputs were not all delivered)."""
        self._writes = {}

    def apply(self) -> int:
        """Write the held writes to the table, in the order they were made; how many."""
        writes, self._writes = self._writes, {}
        at = getattr(self.table, "at_partition", None)
        for key, (value, partition) in writes.items():
            if at is not None:
                at(partition)
            if value is _GONE:
                self.table.pop(key, None)
            else:
                self.table[key] = value
        if at is not None:
            at(None)
        return len(writes)


@dataclass(frozen=True)
class Raw:
    """One record as it came off a topic, undecoded."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] | None = None


Send = Callable[[str, bytes | None, bytes, int | None], Awaitable[Any]]
"""Queue one record (topic, key, value, partition); returns an awaitable that completes when
the broker acknowledged it, or None where the caller confirms delivery itself (replays)."""


@dataclass
class StageRunner:
    """Runs one stage's handler over batches of records; see the module docstring."""

    stage: str
    handler: Handler
    serdes: Serdes
    send: Send
    state: StagedState | None = None    # the overlay the handler was built over, if stateful
    concurrency: int = 1                # records of a batch handled side by side (stateless stages)
    counts: Counter = field(default_factory=Counter)
    timing: Counter = field(default_factory=Counter)  # seconds spent handling / sending / waiting
    raw_topics: frozenset[str] = frozenset()  # control topics the handler reads as bytes
    retry_max_s: float = 30.0

    async def process(self, topic: str, partition: int, offset: int, key: bytes | None,
                      value: bytes | None, headers: dict[str, bytes] | None = None) -> None:
        await self.process_batch([Raw(topic, partition, offset, key, value, headers)])

    async def process_batch(self, records: Sequence[Raw]) -> None:
        try:
            await self._process_batch(records)
        except BaseException:
            if self.state is not None:
                self.state.discard()   # whatever this batch wrote is not kept
            raise

    async def _process_batch(self, records: Sequence[Raw]) -> None:
        t0 = time.perf_counter()
        results: list[Result] | None = None
        if self.concurrency > 1 and len(records) > 1:
            if self.state is not None:
                raise ValueError(f"{self.stage}: a stateful stage handles its records one by one")
            gate = asyncio.Semaphore(self.concurrency)

            async def one(r: Raw) -> Result:
                async with gate:
                    return await self._handle(r)

            results = list(await asyncio.gather(*(one(r) for r in records)))
        handled = time.perf_counter() - t0
        deliveries, sent = [], []
        for i, r in enumerate(records):
            if results is not None:
                result = results[i]
            else:
                h0 = time.perf_counter()
                if self.state is not None:
                    self.state.partition = r.partition
                result = await self._handle(r)
                handled += time.perf_counter() - h0
            try:
                encoded = [self.serdes.encode(e) for e in result.outputs]
            except SchemaError as exc:
                # An output the schema refuses is a bug of this stage on this record: keep going.
                result, encoded = Result(), [self.serdes.encode(dead_lettered(
                    self.stage, r.topic, r.partition, r.offset, r.key, r.value, exc, r.headers))]
                self.counts["dead-lettered"] += 1
            for out_topic, data in encoded:
                dl = out_topic == self.serdes.topics["DeadLettered"]
                sent.append((out_topic, r.key, data, 0 if dl else r.partition))
                delivery = await self.send(*sent[-1])
                if delivery is not None:
                    deliveries.append(delivery)
            if result.keep is not None:
                result.keep()
            self.counts["out"] += sum(1 for t, _ in encoded if t != self.serdes.topics["DeadLettered"])
            if result.note:
                self.counts[result.note.split(":")[0]] += 1
        t1 = time.perf_counter()
        await self._delivered(deliveries, sent)
        if self.state is not None:
            self.state.apply()
        self.timing["handle"] += handled
        self.timing["send"] += t1 - t0 - handled
        self.timing["deliver"] += time.perf_counter() - t1
        self.counts["in"] += len(records)
        self.counts["batches"] += 1

    async def _delivered(self, deliveries: list, sent: list[tuple]) -> None:
        """Wait until every output of the batch is acknowledged, sending them all again (same
        derived ids: downstream drops the repeats) after a failure. Raising instead would not
        bring the batch back: faust acks a batch's records even when the agent body fails."""
        attempt = 0
        while True:
            try:
                if deliveries:
                    await asyncio.gather(*deliveries)
                return
            except Exception as exc:  # noqa: BLE001 - Kafka refused or timed out: retry, never skip
                attempt += 1
                delay = min(self.retry_max_s, 0.5 * 2 ** attempt)
                log.error("%s: %d output(s) of a batch not delivered (%s); sending them again in %.1fs",
                          self.stage, len(sent), exc, delay)
                await asyncio.sleep(delay)
                deliveries = [d for d in [await self.send(*s) for s in sent] if d is not None]

    async def _handle(self, r: Raw) -> Result:
        topic, partition, offset, key, value, headers = r.topic, r.partition, r.offset, r.key, r.value, r.headers
        delay = 0.5
        while True:
            try:
                event = value if topic in self.raw_topics else self.serdes.decode(
                    topic, value, partition, offset)
                return await self.handler(event, key, partition, offset)
            except JudgeUnavailable as exc:
                log.warning("%s: %s; retrying %s[%d]@%d in %.1fs", self.stage, exc, topic,
                            partition, offset, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
            except Exception as exc:  # noqa: BLE001 - any bad record is dead-lettered, not fatal
                log.warning("%s: dead-lettering %s[%d]@%d: %s", self.stage, topic, partition, offset, exc)
                self.counts["dead-lettered"] += 1
                return Result([dead_lettered(self.stage, topic, partition, offset, key, value, exc, headers)])

