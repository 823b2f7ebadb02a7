"""Sessionize: join each main turn with the next state that followed it → TransitionFormed.

Per session (the Kafka key, so a session's turns and feedback meet in one partition) one
turn is pending at a time, with the feedback that arrived since its response. It closes:

| what arrives                              | closes as    | next state carried                         |
|-------------------------------------------|--------------|--------------------------------------------|
| the next MAIN turn of the session         | NEXT_TURN    | every message after the response (user text, all tool results) + feedback that occurred before that turn |
| feedback THUMBS / OUTCOME_REWARD / TEST_RESULT | FEEDBACK | that verdict + feedback since              |
| feedback SESSION_END                      | SESSION_END  | feedback since                             |
| other feedback (user message, tool/terminal output, GUI change) | stays open | accumulated (parallel tool results all count) |
| feedback naming a later turn index        | held         | joins that turn when it is read            |
| nothing for ``transition_timeout_s``       | FEEDBACK if any accumulated, else TIMEOUT | accumulated feedback |

Turns and feedback are two topics, and neither Kafka nor faust orders records across topics:
while a restarted worker catches up it can read a SESSION_END before the turns that preceded
it. So a closing verdict only closes once the wiring says the turns of that partition are
*caught up* to the verdict's time (``caught_up``); until then it waits in the state, and the
first turn read in its partition that occurred after it settles it (``HeldVerdicts``), or else
the periodic check. Feedback is split by event time (``occurred_at``) when the next
turn arrives: what occurred before it belonged to the previous turn.

SIDE turns never train and never close a transition. A replayed turn (same id as the pending
one, or an older index) and a duplicate feedback id change nothing. Feedback naming another
turn index than the pending one (late, for a turn already closed) is not joined: a turn forms
one transition, so it is trained once; the feedback stays in its topic.

The transition id is ``derived_id("sessionize", turn id)``: reprocessing after a crash gives
the same id and downstream drops the duplicate. Idle time is processing time
(``Pending.updated_at``), so a replay of old history does not time out everything at once.

Pure: ``on_turn``, ``on_feedback``, ``on_check`` take the pending state and return the new
state and the transitions to send. ``handler`` runs them over the stage's table (a faust table
live, a dict in replays) and ``STAGE`` declares the stage (processors.stage); the periodic
``scan`` asks the handler to check idle turns through the stage's control topic.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from infra.settings import Settings
from processors.dead_letters import validate_turn
from processors.stage import Context, ControlSend, Handler, InputOffsets, Result, Stage, Timer
from schemas.events import (
    FeedbackKind,
    FeedbackReceived,
    NextStateKind,
    TransitionFormed,
    TurnRecorded,
    TurnType,
    derived_id,
)

VERDICTS = {FeedbackKind.THUMBS, FeedbackKind.OUTCOME_REWARD, FeedbackKind.TEST_RESULT}
CLOSERS = VERDICTS | {FeedbackKind.SESSION_END}

log = logging.getLogger("nextstate.processors")


class Pending(BaseModel):
    """The table value: the open turn of a session and what arrived since its response."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    turn: TurnRecorded | None = None  # None: feedback read before any turn of the session
    feedback: list[FeedbackReceived] = []
    partition: int = 0
    updated_at: float = 0.0

    def to_table(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_table(cls, value: dict[str, Any] | None) -> "Pending | None":
        return None if value is None else cls.model_validate(value)


@dataclass
class Step:
    state: Pending | None
    outputs: list[TransitionFormed] = field(default_factory=list)
    note: str | None = None  # why nothing happened, for counters and logs


def next_messages(prev: TurnRecorded, nxt: TurnRecorded) -> list[dict[str, Any]]:
    """The messages `nxt` sent that `prev` had not: the response itself is skipped, every
    user text and tool result after it is kept. If the client rewrote history (fewer
    messages than before), everything after the last assistant message is the next state.
    A turn that continued a prefill (``continue_final_message``) ends with it: part of the
    action, not of the state."""
    def unprefilled(turn: TurnRecorded) -> list[dict[str, Any]]:
        messages = json.loads(turn.messages_json)
        if turn.continue_final_message and messages and messages[-1].get("role") == "assistant":
            return messages[:-1]
        return messages

    before = unprefilled(prev)
    after = unprefilled(nxt)
    if len(after) > len(before) and after[:len(before)] == before:
        rest = after[len(before):]
        return rest[1:] if rest and rest[0].get("role") == "assistant" else rest
    for i in range(len(after) - 1, -1, -1):
        if after[i].get("role") == "assistant":
            return after[i + 1:]
    return after


def transition_id(turn: TurnRecorded) -> str:
    return derived_id("sessionize", turn.event_id)


def close(pending: Pending, kind: NextStateKind, feedback: list[FeedbackReceived],
          next_turn: TurnRecorded | None = None) -> TransitionFormed:
    turn = pending.turn
    nxt = next_messages(turn, next_turn) if next_turn is not None else []
    parents = [turn.event_id] + ([next_turn.event_id] if next_turn else []) + [f.event_id for f in feedback]
    return TransitionFormed(
        event_id=transition_id(turn), parent_ids=parents, tenant=turn.tenant,
        session_id=turn.session_id, turn_index=turn.turn_index, turn=turn,
        next_state_kind=kind, next_messages_json=json.dumps(nxt, ensure_ascii=False),
        feedback=feedback, next_turn_event_id=next_turn.event_id if next_turn else None,
    )


def _for_turn(f: FeedbackReceived, turn: TurnRecorded) -> bool:
    """Does `f` belong to `turn`'s next state? By the index it names, else by event time."""
    if f.turn_index is not None:
        return f.turn_index == turn.turn_index
    return f.occurred_at >= turn.occurred_at


def _future(f: FeedbackReceived, turn: TurnRecorded) -> bool:
    """Feedback naming a later turn, read before that turn (cross-topic order)."""
    return f.turn_index is not None and f.turn_index > turn.turn_index


def closing(pending: Pending) -> list[FeedbackReceived]:
    """Feedback held in the state that must wait until the turns stream has caught up: verdicts
    for the pending turn, and anything read before its turn."""
    if pending.turn is None:
        return list(pending.feedback)
    return [f for f in pending.feedback if f.kind in CLOSERS and not _future(f, pending.turn)]


def _settle(pending: Pending, caught_up: bool, outputs: list[TransitionFormed]) -> Step:
    if not (closing(pending) and caught_up):
        return Step(pending, outputs)
    if pending.turn is None:  # caught up and still no turn: the feedback was for a closed turn
        return Step(None, outputs, note="feedback with no pending turn")
    mine = [f for f in pending.feedback if not _future(f, pending.turn)]
    later = [f for f in pending.feedback if _future(f, pending.turn)]
    ended = any(f.kind is FeedbackKind.SESSION_END for f in mine)
    kind = NextStateKind.SESSION_END if ended else NextStateKind.FEEDBACK
    rest = Pending(feedback=later, partition=pending.partition, updated_at=pending.updated_at) if later else None
    return Step(rest, [*outputs, close(pending, kind, mine)])


def on_turn(pending: Pending | None, turn: TurnRecorded, partition: int, now: float,
            caught_up: bool = False) -> Step:
    validate_turn(turn)
    if turn.turn_type is not TurnType.MAIN:
        return Step(pending, note="side turn")
    if pending is not None and pending.turn is not None:
        if turn.event_id == pending.turn.event_id:
            return Step(pending, note="turn already pending")
        if turn.turn_index <= pending.turn.turn_index:
            return Step(pending, note=f"stale turn index {turn.turn_index} <= {pending.turn.turn_index}")
    # Held feedback is split: what names this turn (or a later one), or occurred at or after it
    # with no index, is read early from the other topic and stays; the rest was the previous
    # turn's next state.
    held = pending.feedback if pending is not None else []
    after = [f for f in held if _for_turn(f, turn) or _future(f, turn)]
    before = [f for f in held if f not in after]
    outputs = []
    if pending is not None and pending.turn is not None:
        outputs.append(close(pending, NextStateKind.NEXT_TURN, before, next_turn=turn))
    return _settle(Pending(turn=turn, feedback=after, partition=partition, updated_at=now),
                   caught_up, outputs)


def on_feedback(pending: Pending | None, fb: FeedbackReceived, partition: int, now: float,
                caught_up: bool) -> Step:
    """`caught_up`: every turn of this partition that occurred before `fb` has been processed
    (the wiring knows; held feedback waits in the state until it is true)."""
    if pending is None or pending.turn is None:
        held = pending.feedback if pending is not None else []
        if caught_up:
            return Step(pending, note=f"{fb.kind.value} feedback with no pending turn")
        if any(f.event_id == fb.event_id for f in held):
            return Step(pending, note="duplicate feedback")
        return Step(Pending(feedback=[*held, fb], partition=partition, updated_at=now),
                    note="feedback held until its turn is read")
    if fb.turn_index is not None and fb.turn_index < pending.turn.turn_index:
        return Step(pending, note=f"feedback for turn {fb.turn_index}, pending is {pending.turn.turn_index}")
    if fb.turn_index is None and fb.occurred_at < pending.turn.occurred_at:
        return Step(pending, note="feedback older than the pending turn")
    if any(f.event_id == fb.event_id for f in pending.feedback):
        return Step(pending, note="duplicate feedback")
    updated = pending.model_copy(update={"feedback": [*pending.feedback, fb], "updated_at": now})
    if _future(fb, pending.turn):
        return Step(updated, note="feedback held until its turn is read")
    return _settle(updated, caught_up, [])


def pending_id(pending: Pending) -> str:
    """What a periodic check names: the open turn, or '' for feedback still waiting for one."""
    return pending.turn.event_id if pending.turn is not None else ""


def on_check(pending: Pending | None, turn_id: str, now: float, timeout_s: float,
             caught_up: bool) -> Step:
    """A periodic check of one session: settle held feedback, or close the turn when idle."""
    if pending is None or pending_id(pending) != turn_id:
        return Step(pending, note="check for a turn no longer pending")
    settled = _settle(pending, caught_up, [])
    if settled.state is not pending:
        return settled
    if now - pending.updated_at < timeout_s:
        return Step(pending, note="not idle long enough")
    if pending.turn is None:
        return Step(None, note="feedback with no turn dropped after the idle timeout")
    mine = [f for f in pending.feedback if not _future(f, pending.turn)]
    kind = NextStateKind.FEEDBACK if mine else NextStateKind.TIMEOUT
    return Step(None, [close(pending, kind, mine)])


def idle(pending: Pending, now: float, timeout_s: float) -> bool:
    return now - pending.updated_at >= timeout_s


def needs_check(pending: Pending, now: float, timeout_s: float) -> bool:
    return bool(closing(pending)) or idle(pending, now, timeout_s)


# -- the stage: the steps above over a table -------------------------------------------------

class TurnsClock:
    """How far the turns topic has been processed, per partition: a closing verdict waits
    until every turn that occurred before it has been read (see processors.sessionize).

    ``offsets`` (the live consumer's, processors.stage.InputOffsets) gives a partition's end
    offset of the turns topic (cached, or asked of the broker when ``fresh``) and the offset
    the group had committed when this worker took the partition (everything below it was
    processed by a predecessor); a replay has none: its records arrive in timestamp order.

    A (re)assignment seeks the consumer back to the committed offsets, so turns already seen
    are read again: what the clock knew is forgotten then, or a verdict read after the rewind
    would close an older turn while its successors are still to be re-read (measured: a
    worker's first rebalance, before its first commit, re-read its partitions from the start)."""

    def __init__(self, offsets: InputOffsets | None = None) -> None:
        self.offsets = offsets
        self.last_offset: dict[int, int] = {}
        self.max_time: dict[int, datetime] = {}
        self.epoch = offsets.assignment() if offsets is not None else 0
        self.confirmed: dict[int, tuple[float, int]] = {}   # partition -> (asked at, broker's end offset)

    def _current(self) -> None:
        epoch = self.offsets.assignment() if self.offsets is not None else 0
        if epoch != self.epoch:
            self.epoch = epoch
            self.last_offset.clear()
            self.max_time.clear()
            self.confirmed.clear()

    def saw(self, partition: int, offset: int, turn: TurnRecorded) -> None:
        self._current()
        if offset <= self.last_offset.get(partition, -1):
            # read again from an earlier offset (a seek we were not told of, or records of the
            # old positions handed on before it): what this partition read before is void
            self.last_offset.pop(partition, None)
            self.max_time.pop(partition, None)
        self.last_offset[partition] = max(offset, self.last_offset.get(partition, -1))
        t = self.max_time.get(partition)
        self.max_time[partition] = turn.occurred_at if t is None else max(t, turn.occurred_at)

    def seen(self, partition: int) -> datetime | None:
        """The latest time of a turn processed in `partition` (since the last assignment)."""
        self._current()
        return self.max_time.get(partition)

    async def _end(self, partition: int, read_at: float | None) -> int:
        """The broker's end offset of the turns partition, asked at or after `read_at` (when the
        verdict was read, wall clock): an answer asked for since serves every verdict read
        before it. A scan's checks come in a burst; with a round trip each through the consumer's
        thread the last 10 % of `nextstate bench pipeline`'s transitions took 27 s, the first
        90 % 11 s (5 s and 9 s with one answer for the burst)."""
        known = self.confirmed.get(partition)
        if read_at is not None and known is not None and known[0] >= read_at:
            return known[1]
        asked = time.time()
        end = await self.offsets.highwater("TurnRecorded", partition, True)
        self.confirmed[partition] = (asked, end)
        return end

    async def caught_up(self, partition: int, when: datetime, periodic: bool = False,
                        read_at: float | None = None) -> bool:
        """Has every turn of `partition` that occurred before `when` been processed? `read_at`:
        when the verdict asking was read (None: now)."""
        self._current()
        seen = self.max_time.get(partition)
        if seen is not None and seen > when:  # equal times may still have a turn to come
            return True
        if self.offsets is None:
            return True  # replay: records arrive in timestamp order already
        end = await self.offsets.highwater("TurnRecorded", partition, False)
        log.debug("turns[%d]: end %s, last processed %s (periodic %s)", partition, end,
                  self.last_offset.get(partition), periodic)
        if partition in self.last_offset:
            if self.last_offset[partition] + 1 < end:
                return False
            # The cached end offset may be stale (low): confirm a "yes" with the broker, so a
            # verdict never closes a turn while a later turn of its session is still unread.
            return self.last_offset[partition] + 1 >= await self._end(partition, read_at)
        # No turn of this partition processed since start: caught up only if a predecessor had
        # processed (committed) every turn there is. Not the fetch position: faust fetches ahead
        # and drops fetched records at a rebalance, so a fetched turn may still be unprocessed
        # (measured: a restarted worker closed turns by a SESSION_END read before their turns).
        committed = await self.offsets.committed("TurnRecorded", partition)
        if end > 0 and (committed is None or committed < end):
            return False
        # a "yes" from the cached end offset is confirmed with the broker, as above
        fresh = await self._end(partition, read_at)
        return fresh <= 0 or (committed is not None and committed >= fresh)


class HeldVerdicts:
    """Which sessions hold a closing verdict that waits for the turns stream, per partition,
    earliest verdict first: a turn read later than a verdict's time lets it close right then,
    not at the next scan. Feedback is small and turns are not, so a worker reading both topics
    runs ahead on feedback: in `nextstate bench pipeline` 1,971 of 2,000 thumbs were read before
    their session's turns, and every one of those sessions closed only through the periodic check.

    Only a hint, kept in memory: each entry is checked against the table before anything is
    done, and what a restart forgets the scan still finds."""

    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[datetime, str]]] = {}

    def note(self, session: str, state: Pending | None) -> None:
        held = closing(state) if state is not None else []
        if held:
            heapq.heappush(self._heaps.setdefault(state.partition, []),
                           (max(f.occurred_at for f in held), session))

    def due(self, partition: int, seen: datetime) -> list[str]:
        """The sessions of `partition` whose verdict is older than `seen` (taken off the index)."""
        heap, out = self._heaps.get(partition), {}
        while heap and heap[0][0] < seen:
            out[heapq.heappop(heap)[1]] = None
        return list(out)


def handler(ctx: Context) -> Handler:
    """Sessionize over any mapping of session id -> Pending (a faust table, or a dict in replays)."""
    timeout_s = ctx.settings.processors.transition_timeout_s
    pending = ctx.state
    clock = TurnsClock(ctx.offsets)
    waiting = HeldVerdicts()

    async def caught_up(p: Pending | None, partition: int, periodic: bool) -> bool:
        held = closing(p) if p is not None else []
        if not held:
            return False
        # the held verdicts were read by the time the state was last updated
        return await clock.caught_up(partition, max(f.occurred_at for f in held), periodic, p.updated_at)

    async def settle_held(partition: int, current: str, current_state: Pending | None) -> dict[str, Step]:
        """Close the held verdicts of `partition` that the turn just read has caught up with;
        their sessions share the turn's partition, so their state and changelog do too."""
        seen = clock.seen(partition)
        out: dict[str, Step] = {}
        for session in waiting.due(partition, seen) if seen is not None else ():
            if session == current:   # the turn's own session: settled above
                waiting.note(session, current_state)
                continue
            p = Pending.from_table(pending.get(session))
            if p is None or not closing(p):
                continue
            settled = _settle(p, await caught_up(p, partition, periodic=False), [])
            if settled.state is p:
                waiting.note(session, p)   # a later verdict still waits
            else:
                out[session] = settled
        return out

    async def handle(event: Any, key: bytes | None, partition: int, offset: int = -1) -> Result:
        now = time.time()
        others: dict[str, Step] = {}   # other sessions of the partition a turn lets close
        if isinstance(event, bytes):  # a check request from the periodic scan
            req = json.loads(event)
            k = req["session_id"]
            before = Pending.from_table(pending.get(k))
            step = on_check(before, req["turn_id"], now, timeout_s,
                                await caught_up(before, partition, periodic=True))
        elif isinstance(event, TurnRecorded):
            k = event.session_id
            before = Pending.from_table(pending.get(k))
            if offset >= 0:
                clock.saw(partition, offset, event)
            step = on_turn(before, event, partition, now)
            if step.state is not None and await caught_up(step.state, partition, periodic=False):
                # the new pending turn already holds a verdict read early from the feedback topic
                step = on_turn(before, event, partition, now, caught_up=True)
            if offset >= 0:
                others = await settle_held(partition, k, step.state)
        elif isinstance(event, FeedbackReceived):
            k = event.session_id
            before = Pending.from_table(pending.get(k))
            waits = before is None or before.turn is None or event.kind in CLOSERS
            ready = waits and await clock.caught_up(partition, event.occurred_at, periodic=False)
            step = on_feedback(before, event, partition, now, ready)
        else:
            raise TypeError(f"sessionize got a {type(event).__name__}")

        def keep() -> None:
            for key, state in [*((key, o.state) for key, o in others.items()), (k, step.state)]:
                if state is None:
                    pending.pop(key, None)
                else:
                    pending[key] = state.to_table()
                waiting.note(key, state)

        log.debug("sessionize %s %s[%d]@%d: %s -> %s, %s", k, type(event).__name__, partition, offset,
                  _brief(before), _brief(step.state), [t.next_state_kind.value for t in step.outputs])
        outputs = [*step.outputs, *(t for o in others.values() for t in o.outputs)]
        changed = step.state is not before or bool(others)
        return Result(outputs, keep if changed else None, step.note)

    return handle


def _brief(p: Pending | None) -> str:
    if p is None:
        return "none"
    turn = "-" if p.turn is None else str(p.turn.turn_index)
    return f"turn {turn} + {[f.kind.value for f in p.feedback]}"


async def scan(settings: Settings, pending: Mapping[str, Any], send: ControlSend) -> None:
    """The periodic check: tables change only while a record is processed, so ask the handler
    (through the control topic, on the session's partition) to look at idle turns and at turns
    holding a verdict that waits for the turns stream to catch up."""
    now = time.time()
    timeout_s = settings.processors.transition_timeout_s
    for k, value in list(pending.items()):
        if not (value.get("feedback") or now - value.get("updated_at", 0.0) >= timeout_s):
            continue   # neither held feedback nor idle: no need to parse it
        p = Pending.from_table(value)
        if p is not None and needs_check(p, now, timeout_s):
            req = json.dumps({"session_id": k, "turn_id": pending_id(p)})
            await send(k.encode(), req.encode(), p.partition)


STAGE = Stage(
    "sessionize", ("TurnRecorded", "FeedbackReceived"), ("TransitionFormed",), handler,
    "each main turn joined with the next state that followed it", table="pending",
    timer=Timer(lambda s: s.processors.timeout_scan_s, scan))
