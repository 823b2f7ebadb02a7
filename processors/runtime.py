"""The generic faust agent body every stage shares: decode → step → send → then keep state.

For each raw record (topics are bytes in, bytes out; values are Confluent-wire Avro that
``schemas.serde.EventSerde`` decodes and encodes):

1. decode it with the registry-bound serde of its topic;
2. call the stage's handler, which returns the events to send and, for stateful stages, a
   ``keep`` callback that writes the new state to the stage's faust table;
3. send every output (to the source record's partition, key = session id) and **await each
   delivery** (``producer_acks=-1``: all in-sync replicas);
4. only then call ``keep``: a crash between 3 and 4 re-sends outputs with the same derived ids
   (downstream drops them), never loses state for outputs that were not sent.

Why offsets are only committed after outputs are produced: faust acks a record when the agent
asks for the next one (after 3 and 4 above); its consumer commits only acked, gap-free offsets,
and before every commit it flushes the producer (``Consumer._commit_offsets`` awaits
``producer.flush()``), which also delivers the table changelog writes made in 4. A killed
worker therefore restarts from the last record whose outputs and state were both delivered.
``stream_wait_empty`` (on) lets a rebalance or shutdown finish the record in hand first.

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
from collections.abc import Awaitable, Callable
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


@dataclass
class StageRunner:
    """Runs one stage's handler over faust events; see the module docstring."""

    stage: str
    handler: Handler
    serdes: Serdes
    send: Callable[[str, bytes | None, bytes, int | None], Awaitable[Any]]
    counts: Counter = field(default_factory=Counter)
    timing: Counter = field(default_factory=Counter)  # seconds spent handling / sending
    raw_topics: frozenset[str] = frozenset()  # control topics the handler reads as bytes
    retry_max_s: float = 30.0

    async def process(self, topic: str, partition: int, offset: int, key: bytes | None,
                      value: bytes | None, headers: dict[str, bytes] | None = None) -> None:
        t0 = time.perf_counter()
        result = await self._handle(topic, partition, offset, key, value, headers)
        t1 = time.perf_counter()
        try:
            encoded = [self.serdes.encode(e) for e in result.outputs]
        except SchemaError as exc:
            # An output the schema refuses is a bug of this stage on this record: keep going.
            result, encoded = Result(), [self.serdes.encode(
                dead_lettered(self.stage, topic, partition, offset, key, value, exc, headers))]
            self.counts["dead-lettered"] += 1
        for out_topic, data in encoded:
            dl = out_topic == self.serdes.topics["DeadLettered"]
            await self.send(out_topic, key, data, 0 if dl else partition)
        t2 = time.perf_counter()
        if result.keep is not None:
            result.keep()
        self.timing["handle"] += t1 - t0
        self.timing["send"] += t2 - t1
        self.counts["in"] += 1
        self.counts["out"] += sum(1 for t, _ in encoded if t != self.serdes.topics["DeadLettered"])
        if result.note:
            self.counts[result.note.split(":")[0]] += 1

    async def _handle(self, topic, partition, offset, key, value, headers) -> Result:
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

