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


class PrefetchingSource:
    """Reads (and decodes) ahead of the trainer in a thread, so the next step's records are in
    hand when the current step ends: a Kafka source's poll + Avro decode otherwise runs between
    steps, on the trainer's time (`nextstate bench learner` compares the two feeds).

    Holds at most `depth` records. Positions stay exact: records are handed out in the order
    they were read, and offsets are advanced by the caller from the records it handled, never
    from the consumer's position. `at_end` is true only when nothing is held here either."""

    def __init__(self, source: SampleSource, depth: int = 256, poll_s: float = 0.2) -> None:
        import queue
        import threading

        self.source, self.poll_s = source, poll_s
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        # held while the reader polls: librdkafka's synchronous commit hangs while another
        # thread polls the same consumer, so commits take it too
        self._reading = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._held: Fed | None = None
        self._thread = threading.Thread(target=self._read, name="sample-prefetch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import queue

        try:
            while not self._stop.is_set():
                with self._reading:
                    fed = self.source.poll(self.poll_s)
                    if fed is None:
                        continue
                    try:
                        self._queue.put_nowait(fed)
                        continue
                    except queue.Full:
                        self._held = fed      # on its way: at_end must not say "done"
                # full: wait for room outside the lock, so a commit is never held up by it
                while not self._stop.is_set():
                    try:
                        self._queue.put(fed, timeout=self.poll_s)
                        break
                    except queue.Full:
                        continue
                self._held = None
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer's thread by poll()
            self._error = exc

    def start_positions(self) -> dict[tuple[str, int], int]:
        return self.source.start_positions()

    def poll(self, timeout: float) -> Fed | None:
        import queue

        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            if self._error is not None:
                raise self._error
            return None

    def at_end(self) -> bool:
        if self._error is not None:
            raise self._error
        if not self._queue.empty() or self._held is not None:
            return False
        with self._reading:   # no record on its way from the source
            return self._queue.empty() and self._held is None and self.source.at_end()

    def commit(self, offsets: Iterable[PartitionOffset]) -> None:
        with self._reading:
            self.source.commit(offsets)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.source.close()
