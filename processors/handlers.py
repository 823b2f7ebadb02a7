"""The stage handlers: each wraps its stage's pure step for the generic runner
(processors.runtime), keeping state in any mutable mapping: a faust changelog table in the
live workers (processors.app), a dict in replays (processors.replay).

A handler takes (event, key, partition, offset) and returns a ``Result``: the events to send
and, for stateful stages, the ``keep`` callback that writes the new state after they were
delivered. ``TurnsClock`` tells sessionize how far the turns topic has been read.
Knows nothing about faust.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime
from typing import Any

from infra.settings import Settings
from processors import sessionize as ses
from processors.assemble import Join, Side, on_side
from processors.hint import judge_hints
from processors.judge import judge_transition
from processors.judges import build_hint_judge, build_reward_judge
from processors.runtime import Handler, Result
from processors.teacher import Teacher
from schemas.events import (FeedbackReceived, HintJudged, HintSelection, Method, RewardJudged,
                            TransitionFormed, TurnRecorded)

log = logging.getLogger("nextstate.processors")


class TurnsClock:
    """How far the turns topic has been processed, per partition: a closing verdict waits
    until every turn that occurred before it has been read (see processors.sessionize).

    ``highwater(partition, fresh)`` gives a partition's end offset (cached, or asked of the
    broker when ``fresh``), ``position`` the consumer's fetch position
    (both from faust's consumer; a dict-backed stand-in in replays)."""

    def __init__(self, highwater: Callable[[int, bool], Awaitable[int]] | None = None,
                 position: Callable[[int], Awaitable[int | None]] | None = None) -> None:
        self.highwater, self.position = highwater, position
        self.last_offset: dict[int, int] = {}
        self.max_time: dict[int, datetime] = {}

    def saw(self, partition: int, offset: int, turn: TurnRecorded) -> None:
        self.last_offset[partition] = max(offset, self.last_offset.get(partition, -1))
        t = self.max_time.get(partition)
        self.max_time[partition] = turn.occurred_at if t is None else max(t, turn.occurred_at)

    async def caught_up(self, partition: int, when: datetime, periodic: bool) -> bool:
        seen = self.max_time.get(partition)
        if seen is not None and seen > when:  # equal times may still have a turn to come
            return True
        if self.highwater is None:
            return True  # replay: records arrive in timestamp order already
        end = await self.highwater(partition, False)
        log.debug("turns[%d]: end %s, last processed %s, position wanted %s", partition, end,
                  self.last_offset.get(partition), periodic)
        if partition in self.last_offset:
            if self.last_offset[partition] + 1 < end:
                return False
            # The cached end offset may be stale (low): confirm a "yes" with the broker, so a
            # verdict never closes a turn while a later turn of its session is still unread.
            return self.last_offset[partition] + 1 >= await self.highwater(partition, True)
        # No turn of this partition processed since start: trust the fetch position only on a
        # periodic check, when anything fetched earlier has long left the stream buffer.
        pos = await self.position(partition) if periodic else None
        return end <= 0 or (pos is not None and pos >= end)


def sessionize_handler(settings: Settings, pending: MutableMapping[str, Any],
                       clock: TurnsClock | None = None) -> Handler:
    """Sessionize over any mapping of session id -> Pending (a faust table, or a dict in replays)."""
    timeout_s = settings.processors.transition_timeout_s
    clock = clock or TurnsClock()

    async def caught_up(p: ses.Pending | None, partition: int, periodic: bool) -> bool:
        held = ses.closing(p) if p is not None else []
        if not held:
            return False
        return await clock.caught_up(partition, max(f.occurred_at for f in held), periodic)

    async def handle(event: Any, key: bytes | None, partition: int, offset: int = -1) -> Result:
        now = time.time()
        if isinstance(event, bytes):  # a check request from the periodic scan
            req = json.loads(event)
            k = req["session_id"]
            before = ses.Pending.from_table(pending.get(k))
            step = ses.on_check(before, req["turn_id"], now, timeout_s,
                                await caught_up(before, partition, periodic=True))
        elif isinstance(event, TurnRecorded):
            k = event.session_id
            before = ses.Pending.from_table(pending.get(k))
            if offset >= 0:
                clock.saw(partition, offset, event)
            step = ses.on_turn(before, event, partition, now)
            if step.state is not None and await caught_up(step.state, partition, periodic=False):
                # the new pending turn already holds a verdict read early from the feedback topic
                step = ses.on_turn(before, event, partition, now, caught_up=True)
        elif isinstance(event, FeedbackReceived):
            k = event.session_id
            before = ses.Pending.from_table(pending.get(k))
            waits = before is None or before.turn is None or event.kind in ses.CLOSERS
            ready = waits and await clock.caught_up(partition, event.occurred_at, periodic=False)
            step = ses.on_feedback(before, event, partition, now, ready)
        else:
            raise TypeError(f"sessionize got a {type(event).__name__}")

        def keep() -> None:
            if step.state is None:
                pending.pop(k, None)
            else:
                pending[k] = step.state.to_table()

        log.debug("sessionize %s %s[%d]@%d: %s -> %s, %s", k, type(event).__name__, partition, offset,
                  _brief(before), _brief(step.state), [t.next_state_kind.value for t in step.outputs])
        return Result(step.outputs, keep if step.state is not before else None, step.note)

    return handle


def _brief(p: ses.Pending | None) -> str:
    if p is None:
        return "none"
    turn = "-" if p.turn is None else str(p.turn.turn_index)
    return f"turn {turn} + {[f.kind.value for f in p.feedback]}"


def judge_handler(settings: Settings) -> Handler:
    s = settings.processors
    judge = build_reward_judge(s)

    async def handle(event: TransitionFormed, key: bytes | None, partition: int, offset: int = -1) -> Result:
        return Result([await judge_transition(event, judge, s.judge_votes)])

    return handle


def hint_handler(settings: Settings, teacher: Teacher | None) -> Handler:
    s = settings.processors
    judge = build_hint_judge(s)
    selection = HintSelection(s.hint_selection.upper())

    async def handle(event: TransitionFormed, key: bytes | None, partition: int, offset: int = -1) -> Result:
        return Result([await judge_hints(event, judge, s.hint_votes, s.hint_min_chars, selection,
                                         teacher, s.overlap_top_k)])

    return handle


SIDES = {TransitionFormed: Side.TRANSITION, RewardJudged: Side.JUDGEMENT, HintJudged: Side.HINT}


def assemble_handler(settings: Settings, joins: MutableMapping[str, Any]) -> Handler:
    method = Method(settings.processors.method.upper())

    async def handle(event: Any, key: bytes | None, partition: int, offset: int = -1) -> Result:
        side = SIDES[type(event)]
        k = event.event_id if side is Side.TRANSITION else event.transition_id
        before = Join.from_table(joins.get(k))
        step = on_side(before, side, event, method)

        def keep() -> None:
            if step.state is None:
                joins.pop(k, None)
            else:
                joins[k] = step.state.to_table()

        return Result(step.outputs, keep if step.state is not before else None, step.note)

    return handle


def make_handler(settings: Settings, stage: str, state: MutableMapping[str, Any] | None = None,
                 teacher: Teacher | None = None) -> Handler:
    """The stage's handler; stateful stages keep their state in `state` (table or dict)."""
    builders = {
        "sessionize": lambda: sessionize_handler(settings, state),
        "judge": lambda: judge_handler(settings),
        "hint": lambda: hint_handler(settings, teacher),
        "assemble": lambda: assemble_handler(settings, state),
    }
    if stage not in builders:
        raise ValueError(f"no stage named {stage!r}; known: {sorted(builders)}")
    return builders[stage]()
