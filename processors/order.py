"""Each input partition's records reach a stage once each, in offset order, with no hole.

faust does not promise that. Around a rebalance it drops records it had fetched but not yet
handed on, and the consumer goes on fetching from where those records had moved it until the
seek back to the committed offsets runs. A record from there can reach the stage before the
records in front of it, which come again only after the seek. Two things then go wrong:

- a stateful join sees a session's later turn before its earlier one, and takes the earlier one
  for a stale repeat. The earlier turn never forms a transition. That fits what a short soak
  that killed sessionize showed, about one run in four: one turn in 459 never closed, its
  successor did (the failure did not come back in later runs, with or without this module);
- faust counts the offsets it jumped over as a gap, a range with nothing to process, so a
  commit can pass records that were never processed. A crash then loses them.

``OffsetOrder`` holds, per input partition, the offset it must see next. It is set at every
seek to the committed offset; where the group has none, to 0, the start of the log. A
record at that offset is handed on. One below it was handed on already since the seek, so it
is dropped. One above it means records in front were skipped. It is dropped too, and the
partition is rewound to the expected offset. If the first record after that rewind is the
lowest one seen above it since, the offsets in between do not exist (transaction markers, compaction, or the head
of a log that retention deleted, before the first record of a never-committed partition), and
it is handed on.

The start of a never-committed partition is not taken from the first record read: records
fetched before the seek and still in faust's hands come after it, and faust drops the ones it
had queued. A worker restarted before its first commit took such a stale record (offset 1) for
the start and never read offset 0, a SESSION_END (seen in a CI run beside a benchmark, and in
1 of 4 runs of tests/processors/test_stages_kafka.py's kill test under CPU load).

Admitted is not yet handed on: faust queues a record for the stage's agent, and empties those
queues at every rebalance *and* every time its flow control resumes, which the end of a
recovery does after the seek. A record admitted between the seek and that resume was lost: the
order took it for delivered and dropped its second reading as a repeat (a restarted sessionize
never read a SESSION_END at offset 0 while it read offsets 1 and 2; a CI run, and the kill
test's first run under CPU load after 29 runs without it had passed). ``dropped`` sets the partition back to the lowest
offset emptied from a queue, and the app reads it from there again.

``processors.app.StageApp`` puts it in front of faust's delivery and turns off faust's own
read-offset filter for the stage's inputs, so this is the only filter. Changelogs are left to
faust. Pure: no Kafka here, so the rules are tested on their own (tests/processors/test_order.py).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


class Verdict(enum.Enum):
    DELIVER = "deliver"        # the next record: hand it on
    REPEAT = "repeat"          # handed on already since the last seek: drop it
    REWIND = "rewind"          # records in front of it were skipped: drop it, seek back
    GAP = "gap"                # after a rewind, the same record came first: a hole in the log


@dataclass
class OffsetOrder:
    """The next offset each partition must deliver; see the module docstring."""

    expected: dict[Hashable, int] = field(default_factory=dict)   # none before the first seek
    counts: Counter = field(default_factory=Counter)
    _rewound: dict[Hashable, tuple[int, int]] = field(default_factory=dict)

    def seeked(self, tp: Hashable, offset: int) -> None:
        """The consumer of `tp` now reads from `offset` (0 where the group never committed)."""
        self.expected[tp] = offset
        self._rewound.pop(tp, None)

    def undo(self, tp: Hashable, offset: int) -> None:
        """The record at `offset` was admitted but never handed on (its delivery was cancelled,
        at a rebalance): expect it again, unless a seek has moved the partition since."""
        if self.expected.get(tp) == offset + 1:
            self.expected[tp] = offset
            self.counts["undone"] += 1

    def dropped(self, tp: Hashable, offset: int) -> bool:
        """Records from `offset` on were admitted, then dropped before they were handed on
        (faust empties its queues whenever the flow resumes): expect `offset` again. True when
        the partition must be read from there again; False when nothing from `offset` on was
        admitted (a seek since has set the partition to `offset` or lower)."""
        expected = self.expected.get(tp)
        if expected is None or offset >= expected:
            return False
        self.expected[tp] = offset
        self._rewound.pop(tp, None)
        self.counts["dropped"] += 1
        return True

    def admit(self, tp: Hashable, offset: int) -> Verdict:
        expected = self.expected.get(tp)
        if expected is None or offset == expected:
            verdict = Verdict.DELIVER
        elif offset < expected:
            verdict = Verdict.REPEAT
        elif self._rewound.get(tp) == (expected, offset):
            verdict = Verdict.GAP
        else:
            # the lowest record seen above `expected` since the rewind: the rest of a stale batch
            # comes after it, and the first record read again after the seek is compared with it
            # (keeping the last one instead rewound for ever when a batch held more than one)
            prev = self._rewound.get(tp)
            if prev is None or prev[0] != expected or offset < prev[1]:
                self._rewound[tp] = (expected, offset)
            verdict = Verdict.REWIND
        if verdict in (Verdict.DELIVER, Verdict.GAP):
            self.expected[tp] = offset + 1
            self._rewound.pop(tp, None)
        self.counts[verdict.value] += 1
        return verdict


class UnfilteredReadOffsets(dict):
    """faust's per-partition read offsets with the stage's input partitions left out: faust
    drops a record below the read offset and counts a jump above it as a gap. For inputs,
    ``OffsetOrder`` decides instead, so faust reads None (no filter, no gap) for them."""

    def __init__(self, skip: Callable[[], frozenset[str]]) -> None:
        super().__init__()
        self.skip = skip

    def __getitem__(self, tp: object) -> int | None:
        if getattr(tp, "topic", None) in self.skip():
            return None
        return self.get(tp)
