"""Where the learner's samples come from: what a source is (`SampleSource`, handing out
`Fed` records with their place in the log), and the in-memory source of benchmarks and tests.

The Kafka source, reading `samples` from recorded offsets, is learner.kafka_source. Knows
nothing about training.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from schemas.events import PartitionOffset, SampleReady


@dataclass(frozen=True)
class Fed:
    """One sample and the place in the log it was read from."""

    sample: SampleReady
    topic: str
    partition: int
    offset: int


class SampleSource(Protocol):
    def start_positions(self) -> dict[tuple[str, int], int]: ...
    def poll(self, timeout: float) -> Fed | None: ...
    def at_end(self) -> bool: ...
    def commit(self, offsets: Iterable[PartitionOffset]) -> None: ...
    def close(self) -> None: ...


class MemorySampleSource:
    """The same feed from a list, for measuring the loop without Kafka."""

    def __init__(self, samples: Iterable[SampleReady], topic: str = "memory") -> None:
        self._queue = deque(Fed(s, topic, 0, i) for i, s in enumerate(samples))
        self._topic = topic

    def start_positions(self) -> dict[tuple[str, int], int]:
        return {(self._topic, 0): 0}

    def poll(self, timeout: float) -> Fed | None:
        return self._queue.popleft() if self._queue else None

    def at_end(self) -> bool:
        return not self._queue

    def commit(self, offsets: Iterable[PartitionOffset]) -> None:
        pass

    def close(self) -> None:
        pass
