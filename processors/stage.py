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

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
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
