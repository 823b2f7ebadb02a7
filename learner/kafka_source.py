"""The learner's samples from Kafka, and the dead letters of samples it cannot train.

`KafkaSampleSource` *assigns* every partition of the namespace's `samples` topic at concrete
start offsets (no group rebalancing: one learner process per run), so the position it
resumes from is the one stored in the last published checkpoint, never the group's committed
offset. Commits happen only after a checkpoint is published and are informational (lag
dashboards). Undecodable records go to `dead-letters`, and so do decodable samples that
cannot be trained (`dead_letter_invalid`). A start spec for a new run is ``beginning``,
``end``, an offset (every partition), or an ISO-8601 time. The protocol and the in-memory
source live in learner.sources.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from confluent_kafka import TopicPartition

from infra.errors import ConfigError
from infra.kafka import EventConsumer, EventProducer, OnDecodeError, parse_position, ready_partitions
from infra.settings import KafkaSettings
from learner.sources import Fed
from schemas.events import DeadLettered, PartitionOffset


class KafkaSampleSource:
    def __init__(self, kafka: KafkaSettings, registry, namespace: str | None, run: str,
                 stored: list[PartitionOffset] | None, start: str = "beginning",
                 dead_letters: EventProducer | None = None) -> None:
        self.consumer = EventConsumer(
            kafka, registry, group_id=f"nextstate-learner-{run}", namespace=namespace,
            on_decode_error=OnDecodeError.DEAD_LETTER if dead_letters else OnDecodeError.SKIP,
            dead_letters=dead_letters, stage="learner")
        self.topic = self.consumer.topic("SampleReady")
        partitions = ready_partitions(self.consumer.raw, self.topic)
        if partitions is None:
            raise ConfigError(f"topic {self.topic!r} does not exist (or has no leader); run `nextstate provision`")
        self.partitions = partitions
        self._start = self._resolve(stored, parse_position(start, '--from'))
        self.consumer.assign([TopicPartition(self.topic, p, o) for (_, p), o in self._start.items()])

    def _watermarks(self, p: int) -> tuple[int, int]:
        return self.consumer.raw.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10,
                                                       cached=False)

    def _resolve(self, stored: list[PartitionOffset] | None, start) -> dict[tuple[str, int], int]:
        """Concrete start offsets for every partition, so every checkpoint can name all of them."""
        if stored is not None:
            have = {o.partition: o.offset for o in stored if o.topic == self.topic}
            # A partition the checkpoint does not know (added since) starts at its beginning.
            return {(self.topic, p): have.get(p, self._watermarks(p)[0]) for p in self.partitions}
        if isinstance(start, datetime):
            ms = int(start.timestamp() * 1000)
            found = self.consumer.raw.offsets_for_times(
                [TopicPartition(self.topic, p, ms) for p in self.partitions], timeout=30)
            # No record at or after the time: start at the end of that partition.
            return {(self.topic, tp.partition): tp.offset if tp.offset >= 0 else self._watermarks(tp.partition)[1]
                    for tp in found}
        out = {}
        for p in self.partitions:
            low, high = self._watermarks(p)
            if start == "beginning":
                out[(self.topic, p)] = low
            elif start == "end":
                out[(self.topic, p)] = high
            else:
                out[(self.topic, p)] = min(max(int(start), low), high)
        return out

    def start_positions(self) -> dict[tuple[str, int], int]:
        return dict(self._start)

    def poll(self, timeout: float) -> Fed | None:
        record = self.consumer.poll(timeout)
        if record is None:
            return None
        return Fed(record.event, record.topic, record.partition, record.offset)

    def at_end(self) -> bool:
        """True when every partition's position has reached its high watermark (now)."""
        positions = self.consumer.raw.position([TopicPartition(self.topic, p) for p in self.partitions])
        for tp in positions:
            low, high = self._watermarks(tp.partition)
            pos = tp.offset if tp.offset >= 0 else self._start[(self.topic, tp.partition)]
            if pos < high:
                return False
        return True

    def commit(self, offsets: Iterable[PartitionOffset]) -> None:
        tps = [TopicPartition(o.topic, o.partition, o.offset) for o in offsets if o.offset >= 0]
        if tps:
            self.consumer.raw.commit(offsets=tps, asynchronous=False)

    def close(self) -> None:
        self.consumer.close()



def dead_letter_invalid(producer: EventProducer, run: str):
    """A callback sending a decodable-but-untrainable sample to `dead-letters` with the reason;
    the stage names the run, so two runs setting aside one sample leave two dead letters."""

    def send(fed: Fed, exc: Exception) -> None:
        value = producer.serde("SampleReady").serialize(fed.sample)   # the event, re-encoded
        producer.send(DeadLettered.of(f"learner-{run}", fed.topic, fed.partition, fed.offset,
                                      fed.sample.session_id.encode(), value, exc), key=fed.sample.session_id)
        producer.flush()

    return send
