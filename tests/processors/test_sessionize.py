"""Sessionize's pure steps: which next state closes a turn, and what it carries."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from processors.dead_letters import InvalidRecord
from processors.sessionize import Pending, next_messages, on_check, on_feedback, on_turn, transition_id
from schemas.events import FeedbackKind, NextStateKind, TurnType
from tests.processors.helpers import conversation, feedback, turn


def test_next_turn_carries_every_message_since_the_response():
    t0, t1, _ = conversation("s", 3)
    step = on_turn(None, t0, 1, now=0.0)
    assert step.outputs == [] and step.state.turn == t0 and step.state.partition == 1
    step = on_turn(step.state, t1, 1, now=1.0)
    (tr,) = step.outputs
    assert tr.next_state_kind is NextStateKind.NEXT_TURN and tr.next_turn_event_id == t1.event_id
    assert [m["content"] for m in json.loads(tr.next_messages_json)] == [
        "tool result 0a", "tool result 0b", "thanks, now step 1"]
    assert tr.event_id == transition_id(t0) and tr.turn == t0
    assert step.state.turn == t1


def test_rewritten_history_falls_back_to_after_last_assistant():
    a = turn("s", 0, [{"role": "user", "content": "long history"}, {"role": "user", "content": "q"}])
    b = turn("s", 1, [{"role": "assistant", "content": "summary"}, {"role": "user", "content": "next"}])
    assert next_messages(a, b) == [{"role": "user", "content": "next"}]


def test_verdicts_close_once_turns_caught_up_other_feedback_accumulates():
    (t0,) = conversation("s", 1)
    state = on_turn(None, t0, 0, 0.0).state
    tool_a = feedback("s", FeedbackKind.TOOL_OUTPUT, 0, text="a", exit_code=0)
    tool_b = feedback("s", FeedbackKind.TOOL_OUTPUT, None, text="b", exit_code=1)
    state = on_feedback(state, tool_a, 0, 1.0, True).state
    step = on_feedback(state, tool_b, 0, 2.0, True)
    assert step.outputs == [] and [f.text for f in step.state.feedback] == ["a", "b"]
    assert on_feedback(step.state, tool_b, 0, 3.0, True).note == "duplicate feedback"
    thumbs = feedback("s", FeedbackKind.THUMBS, 0, thumbs=-1)
    held = on_feedback(step.state, thumbs, 0, 4.0, False)   # turns not caught up: wait
    assert held.outputs == [] and held.state.feedback[-1] == thumbs
    assert on_check(held.state, t0.event_id, 5.0, 600, caught_up=False).outputs == []
    done = on_check(held.state, t0.event_id, 5.0, 600, caught_up=True)
    (tr,) = done.outputs
    assert done.state is None and tr.next_state_kind is NextStateKind.FEEDBACK
    assert [f.kind for f in tr.feedback] == [FeedbackKind.TOOL_OUTPUT] * 2 + [FeedbackKind.THUMBS]
    (tr2,) = on_feedback(step.state, thumbs, 0, 4.0, True).outputs  # caught up: at once
    assert tr2 == tr.model_copy(update={"occurred_at": tr2.occurred_at})


def test_session_end_read_before_the_turns_that_preceded_it():
    # Catch-up after a restart: SESSION_END (feedback topic) is read before turns 1 and 2.
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    t0, t1, t2 = (t.model_copy(update={"occurred_at": base + timedelta(seconds=i)})
                  for i, t in enumerate(conversation("s", 3)))
    end = feedback("s", FeedbackKind.SESSION_END, occurred_at=base + timedelta(seconds=3))
    state = on_turn(None, t0, 0, 0.0).state
    held = on_feedback(state, end, 0, 1.0, False)
    assert held.outputs == []
    s1 = on_turn(held.state, t1, 0, 2.0)            # closes t0 with NEXT_TURN, the end moves on
    (tr0,) = s1.outputs
    assert tr0.next_state_kind is NextStateKind.NEXT_TURN and tr0.feedback == []
    assert s1.state.feedback == [end]
    s2 = on_turn(s1.state, t2, 0, 3.0, caught_up=True)   # t2 is the last turn: end applies to it
    tr1, tr2 = s2.outputs
    assert tr1.turn == t1 and tr1.next_state_kind is NextStateKind.NEXT_TURN
    assert tr2.turn == t2 and tr2.next_state_kind is NextStateKind.SESSION_END and s2.state is None


def test_session_end_and_timeout():
    (t0,) = conversation("s", 1)
    state = on_turn(None, t0, 0, 0.0).state
    (tr,) = on_feedback(state, feedback("s", FeedbackKind.SESSION_END), 0, 1.0, True).outputs
    assert tr.next_state_kind is NextStateKind.SESSION_END
    assert on_check(state, t0.event_id, 5.0, 10, False).note == "not idle long enough"
    (tr,) = on_check(state, t0.event_id, 11.0, 10, False).outputs
    assert tr.next_state_kind is NextStateKind.TIMEOUT
    # feedback that does not close the turn restarts the idle clock
    with_fb = on_feedback(state, feedback("s", FeedbackKind.USER_MESSAGE, text="hm"), 0, 5.0, True).state
    assert on_check(with_fb, t0.event_id, 11.0, 10, False).outputs == []
    (tr,) = on_check(with_fb, t0.event_id, 15.0, 10, False).outputs
    assert tr.next_state_kind is NextStateKind.FEEDBACK and tr.feedback[0].text == "hm"
    assert on_check(state, "some-other-turn", 99.0, 10, True).outputs == []


def test_replays_side_turns_and_stray_feedback_change_nothing():
    t0, t1 = conversation("s", 2)
    state = on_turn(None, t0, 0, 0.0).state
    assert on_turn(state, t0, 0, 1.0).state is state                       # redelivered
    state1 = on_turn(state, t1, 0, 1.0).state
    assert on_turn(state1, t0, 0, 2.0).note.startswith("stale turn")      # older index
    side = turn("s", 5, [], turn_type=TurnType.SIDE)
    assert on_turn(state1, side, 0, 2.0).state is state1
    late = on_feedback(state1, feedback("s", FeedbackKind.THUMBS, 0, thumbs=1), 0, 2.0, True)
    assert late.outputs == [] and late.note.startswith("feedback for turn 0")
    assert on_feedback(None, feedback("s", FeedbackKind.THUMBS, thumbs=1), 0, 0.0, True).note


def test_invalid_turn_is_rejected_with_the_numbers():
    bad = turn("s", 0, [], n=4, response_logprobs=[-0.1] * 3)
    with pytest.raises(InvalidRecord, match="4 response tokens but 3 logprobs"):
        on_turn(None, bad, 0, 0.0)


def test_pending_round_trips_through_table_json():
    t0, = conversation("s", 1)
    p = on_feedback(on_turn(None, t0, 2, 0.0).state, feedback("s", FeedbackKind.TOOL_OUTPUT, text="x"), 0, 1.0, True).state
    assert Pending.from_table(json.loads(json.dumps(p.to_table()))) == p


def test_feedback_read_before_its_session_turns_is_held():
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    t0, t1 = (t.model_copy(update={"occurred_at": base + timedelta(seconds=i)})
              for i, t in enumerate(conversation("s", 2)))
    end = feedback("s", FeedbackKind.SESSION_END, occurred_at=base + timedelta(seconds=5))
    held = on_feedback(None, end, 2, 0.0, caught_up=False)
    assert held.state.turn is None and held.state.partition == 2 and held.outputs == []
    s0 = on_turn(held.state, t0, 2, 1.0)
    assert s0.outputs == [] and s0.state.feedback == [end]
    s1 = on_turn(s0.state, t1, 2, 2.0, caught_up=True)
    assert [t.next_state_kind for t in s1.outputs] == [NextStateKind.NEXT_TURN, NextStateKind.SESSION_END]
    # caught up and still no turn: the feedback was for a turn closed long ago
    assert on_check(held.state, "", 1.0, 600, caught_up=True).state is None
    assert on_feedback(None, end, 2, 0.0, caught_up=True).state is None


def test_feedback_naming_a_later_turn_waits_for_it():
    t0, t1 = conversation("s", 2)
    thumbs = feedback("s", FeedbackKind.THUMBS, 1, thumbs=1)
    state = on_turn(None, t0, 0, 0.0).state
    held = on_feedback(state, thumbs, 0, 1.0, caught_up=True)  # for turn 1, read before it
    assert held.outputs == [] and held.note == "feedback held until its turn is read"
    step = on_turn(held.state, t1, 0, 2.0, caught_up=True)
    tr0, tr1 = step.outputs
    assert tr0.turn == t0 and tr0.feedback == [] and tr0.next_state_kind is NextStateKind.NEXT_TURN
    assert tr1.turn == t1 and tr1.feedback == [thumbs] and tr1.next_state_kind is NextStateKind.FEEDBACK


def test_the_turns_clock_trusts_what_was_processed_not_what_was_fetched():
    import asyncio
    from datetime import datetime, timezone

    from processors.sessionize import TurnsClock

    class Offsets:   # a partition with 7 turns; a predecessor had processed `done` of them
        def __init__(self, done):
            self.done = done

        async def highwater(self, event, partition, fresh):
            return 7

        async def committed(self, event, partition):
            return self.done

        def assignment(self):
            return 1

    when = datetime.now(timezone.utc)
    assert not asyncio.run(TurnsClock(Offsets(None)).caught_up(0, when, periodic=True))   # nothing processed
    assert not asyncio.run(TurnsClock(Offsets(5)).caught_up(0, when, periodic=True))      # two still to read
    assert asyncio.run(TurnsClock(Offsets(7)).caught_up(0, when))                         # all of them
    clock = TurnsClock(Offsets(None))
    clock.saw(0, 6, turn("s", 0, [{"role": "user", "content": "q"}]))   # this worker read the last one
    assert asyncio.run(clock.caught_up(0, datetime(2100, 1, 1, tzinfo=timezone.utc)))   # by offsets, not time


def test_the_turns_clock_forgets_what_it_read_when_partitions_are_reassigned():
    """A rebalance before the first commit seeks back to the start: the turns are read again,
    and a SESSION_END read early must wait for them, not trust the positions read before."""
    import asyncio
    from datetime import datetime, timezone

    from processors.sessionize import TurnsClock

    class Offsets:
        epoch = 1

        async def highwater(self, event, partition, fresh):
            return 4

        async def committed(self, event, partition):
            return None

        def assignment(self):
            return self.epoch

    offsets = Offsets()
    clock = TurnsClock(offsets)
    q = [{"role": "user", "content": "q"}]
    turns = [turn("s", i, q) for i in range(4)]
    end = datetime.now(timezone.utc)   # the SESSION_END: after every turn
    for i, t in enumerate(turns):
        clock.saw(0, i, t)
    assert asyncio.run(clock.caught_up(0, end))
    offsets.epoch = 2   # reassigned: offsets 0..3 will be read again
    assert not asyncio.run(clock.caught_up(0, end))
    clock.saw(0, 0, turns[0])
    assert not asyncio.run(clock.caught_up(0, end))
    for i in range(1, 4):
        clock.saw(0, i, turns[i])
    assert asyncio.run(clock.caught_up(0, end))


def test_a_prefilled_final_message_is_part_of_the_action_not_the_next_state():
    from processors.sessionize import next_messages

    task = [{"role": "user", "content": "What is 12*13?"}]
    prefill = {"role": "assistant", "content": "```python\nprint("}
    first = turn("s", 0, [*task, prefill], response="12*13)\n```", continue_final_message=True)
    second = turn("s", 1, [*task, {"role": "assistant", "content": "```python\nprint(12*13)\n```"},
                           {"role": "user", "content": "Output:\n156"}, prefill], continue_final_message=True)
    assert next_messages(first, second) == [{"role": "user", "content": "Output:\n156"}]


class _Turns:
    """A turns partition of which `end` records exist; counts the broker's fresh answers."""

    def __init__(self, end):
        self.end, self.asked = end, 0

    async def highwater(self, event, partition, fresh):
        self.asked += fresh
        return self.end

    async def committed(self, event, partition):
        return None

    def assignment(self):
        return 1


def _handler(offsets):
    """(run, table): `run(event, offset)` handles a record of partition 0 and keeps its state."""
    from infra.settings import Settings
    from processors.sessionize import handler
    from processors.stage import Context

    table: dict = {}
    handle = handler(Context(Settings(), table, None, offsets))

    async def run(event, offset=-1):
        result = await handle(event, event.session_id.encode(), 0, offset)
        if result.keep:
            result.keep()
        return result

    return run, table


def test_a_turn_read_after_a_held_verdict_closes_it_at_once():
    """Feedback is small and runs ahead of the turns: a thumbs read while later turns of its
    partition are still unread waits; the next turn read that occurred after it closes it, in
    that turn's own result, without waiting for the periodic check."""
    import asyncio

    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    a0 = conversation("a", 1)[0].model_copy(update={"occurred_at": base})
    thumbs = feedback("a", FeedbackKind.THUMBS, 0, thumbs=1, occurred_at=base + timedelta(seconds=1))
    b0 = conversation("b", 1)[0].model_copy(update={"occurred_at": base + timedelta(seconds=2)})
    run, table = _handler(_Turns(end=10))   # ten turns in the partition, one read so far

    async def scenario():
        assert (await run(a0, 0)).outputs == []
        held = await run(thumbs)
        assert held.outputs == [] and table["a"]["feedback"]   # held: turns 1..9 unread
        closed = await run(b0, 1)
        (tr,) = closed.outputs
        assert tr.session_id == "a" and tr.next_state_kind is NextStateKind.FEEDBACK
        assert [f.event_id for f in tr.feedback] == [thumbs.event_id]
        assert "a" not in table and table["b"]["turn"]["event_id"] == b0.event_id
        # the same turn read again (a rewind) closes nothing twice
        assert (await run(b0, 1)).outputs == []

    asyncio.run(scenario())


def test_a_verdict_read_later_than_the_turn_waits_for_a_later_turn():
    import asyncio

    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    a0 = conversation("a", 1)[0].model_copy(update={"occurred_at": base})
    b0 = conversation("b", 1)[0].model_copy(update={"occurred_at": base + timedelta(seconds=1)})
    thumbs = feedback("a", FeedbackKind.THUMBS, 0, thumbs=1, occurred_at=base + timedelta(seconds=2))
    run, table = _handler(_Turns(end=10))

    async def scenario():
        await run(a0, 0)
        await run(thumbs)
        # b0 occurred before the thumbs: a turn of session a between them may still be unread
        assert (await run(b0, 1)).outputs == [] and table["a"]["feedback"]

    asyncio.run(scenario())


def test_a_burst_of_checks_asks_the_broker_once_for_verdicts_read_before_the_answer():
    """The periodic check confirms "caught up" with the broker's end offset; one answer, asked
    after a verdict was read, serves it: a scan's burst of checks is not a round trip each."""
    import asyncio
    import time

    from processors.sessionize import TurnsClock

    offsets = _Turns(end=4)
    clock = TurnsClock(offsets)
    q = [{"role": "user", "content": "q"}]
    for i in range(4):
        clock.saw(0, i, turn("s", i, q))
    later = datetime(2100, 1, 1, tzinfo=timezone.utc)   # no turn read has a later time
    read_at = time.time()
    assert asyncio.run(clock.caught_up(0, later, periodic=True, read_at=read_at))
    assert asyncio.run(clock.caught_up(0, later, periodic=True, read_at=read_at))
    assert offsets.asked == 1
    assert asyncio.run(clock.caught_up(0, later, periodic=True, read_at=time.time() + 1))  # read after it
    assert asyncio.run(clock.caught_up(0, later))   # not said when: asked again
    assert offsets.asked == 3
    offsets.end = 5   # a turn was produced since: the next fresh answer says so
    assert not asyncio.run(clock.caught_up(0, later, read_at=time.time() + 1))
