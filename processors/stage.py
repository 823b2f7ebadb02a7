"""What a stream stage is: the one spec each stage module exports, and what its handler gets.

A ``Stage`` names the events it reads and writes, its state table (if any), how to build its
handler from a ``Context``, and its timer (if any). Everything that runs stages reads these
specs: the faust wiring (processors.app), `nextstate process`, replay (processors.replay),
provisioning of control topics and the docs (processors.topology collects them).

A handler takes (event, key, partition, offset) and returns a ``Result``: the events to send
and, for stateful stages, the ``keep`` callback that writes the new state after the outputs
were delivered. A stage with a timer asks its own handler to act (tables change only while a
record is processed): the timer sends a control request, raw JSON on the stage's own control
topic, and the handler gets it as ``bytes``.

Knows nothing about faust or Kafka.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from infra.settings import Settings


@dataclass
class Result:
    outputs: list[Any] = field(default_factory=list)
    keep: Callable[[], None] | None = None
    note: str | None = None


Handler = Callable[[Any, bytes | None, int, int], Awaitable[Result]]  # event, key, partition, offset


class InputOffsets(Protocol):
    """How far an input topic has been read (the live consumer; a replay has none)."""

    async def highwater(self, event: str, partition: int, fresh: bool) -> int: ...

    def assignment(self) -> int:
        """Counts the (re)assignments of partitions to this worker. At each one the consumer
        seeks back to the committed offsets, so records are read again: what a stage learned
        about how far it had read is void once this number changes."""
        ...

    async def committed(self, event: str, partition: int) -> int | None:
        """The offset the group had committed when this worker took the partition: every record
        below it was processed by a predecessor (None: nothing was)."""
        ...


@dataclass(frozen=True)
class Context:
    """What a handler is built from."""

    settings: Settings
    state: MutableMapping[str, Any] | None = None   # its table: faust's, or a dict in replays
    teacher: Any = None                             # processors.teacher.Teacher, where the stage uses one
    offsets: InputOffsets | None = None


ControlSend = Callable[[bytes, bytes, int], Awaitable[None]]   # key, value, partition


@dataclass(frozen=True)
class Timer:
    """Every `interval(settings)` seconds `run(settings, state, send)` may send control requests."""

    interval: Callable[[Settings], float]
    run: Callable[[Settings, Mapping[str, Any], ControlSend], Awaitable[None]]


class Requested:
    """The control requests a timer has sent that its stage has not handled yet: a request is
    not sent again while the same one waits on the control topic (younger than `hold_s`).

    A timer scans the whole table every interval. When the stage is behind on its control topic,
    every scan asked again about every entry it had asked about before: in `nextstate bench
    pipeline` sessionize handled 6,766 checks for 2,000 sessions, 4,232 of them about a session
    already closed. After `hold_s` a request is sent again (the partition may have moved to
    another worker, which handled it there)."""

    def __init__(self, hold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s, self.clock = hold_s, clock
        self._sent: dict[tuple[bytes, bytes], float] = {}
        self._pruned = self.clock()

    def ask(self, key: bytes, value: bytes) -> bool:
        """Whether to send this request now (and, if so, note it as sent)."""
        now = self.clock()
        if now - self._pruned >= self.hold_s:   # requests handled elsewhere are never `handled` here
            self._sent = {k: t for k, t in self._sent.items() if now - t < self.hold_s}
            self._pruned = now
        at = self._sent.get((key, value))
        if at is not None and now - at < self.hold_s:
            return False
        self._sent[(key, value)] = now
        return True

    def handled(self, requests: Iterable[tuple[bytes | None, bytes | None]]) -> None:
        for request in requests:
            self._sent.pop(request, None)


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]              # event names read (schemas.events)
    outputs: tuple[str, ...]             # event names written (besides DeadLettered)
    handler: Callable[[Context], Handler]
    summary: str
    table: str | None = None             # the state table's name; None: stateless
    timer: Timer | None = None           # also gives the stage a control topic
    concurrent: bool = False             # processors.stage_concurrency records in flight
    teacher: bool = False                # its process builds the teacher (processors.teacher)
