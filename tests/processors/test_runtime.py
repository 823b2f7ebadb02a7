"""The shared stage runner without Kafka: a batch's state reaches the table only after every
output of the batch was delivered, later records of a batch see earlier records' state, and a
refused output keeps nothing."""

from __future__ import annotations

import asyncio

import pytest

from processors.runtime import Raw, StagedState, StageRunner
from processors.stage import Result


class Table(dict):
    """A dict that records the changelog partition each write names (like StageTable)."""

    def __init__(self) -> None:
        super().__init__()
        self.partition = None
        self.log: list[tuple] = []

    def at_partition(self, partition):
        self.partition = partition

    def __setitem__(self, key, value):
        self.log.append(("set", key, value, self.partition))
        super().__setitem__(key, value)

    def pop(self, key, default=None):
        self.log.append(("del", key, self.partition))
        return super().pop(key, default)


class FakeSerdes:
    topics = {"DeadLettered": "dl", "Out": "out"}

    def decode(self, topic, value, partition, offset):
        return value.decode()

    def encode(self, event):
        return "out", event.encode()


def test_staged_state_reads_its_writes_and_holds_them_back():
    table = Table()
    table["a"] = 1
    staged = StagedState(table)
    staged.partition = 3
    staged["b"] = 2
    staged["a"] = 10
    del staged["a"]
    assert "a" not in staged and staged["b"] == 2 and staged.get("a") is None
    assert sorted(staged) == ["b"] and len(staged) == 1
    assert dict(table) == {"a": 1}                        # nothing applied yet
    with pytest.raises(KeyError):
        del staged["missing"]
    assert staged.apply() == 2
    assert dict(table) == {"b": 2}
    assert ("set", "b", 2, 3) in table.log and ("del", "a", 3) in table.log
    assert table.partition is None                      # reset after applying


def _counting_handler(staged: StagedState):
    """Counts records per key in the state; emits the running count."""

    async def handle(event, key, partition, offset):
        n = staged.get(event, 0) + 1

        def keep():
            staged[event] = n

        return Result([f"{event}={n}"], keep)

    return handle


def test_batch_state_waits_for_every_delivery():
    table = Table()
    staged = StagedState(table)
    sent: list[tuple] = []
    gates: list[asyncio.Future] = []

    async def main():
        loop = asyncio.get_running_loop()

        async def send(topic, key, value, partition):
            fut = loop.create_future()
            gates.append(fut)
            sent.append((value, partition))
            return fut

        runner = StageRunner("count", _counting_handler(staged), FakeSerdes(), send, state=staged)
        batch = [Raw("in", p, i, b"k", v.encode()) for i, (v, p) in enumerate([("x", 0), ("x", 0), ("y", 1)])]
        task = asyncio.create_task(runner.process_batch(batch))
        while len(gates) < 3:                 # every output queued
            await asyncio.sleep(0)
        # every output is queued, later records saw the earlier ones' state, the table has nothing
        assert sent == [(b"x=1", 0), (b"x=2", 0), (b"y=1", 1)]
        assert dict(table) == {} and not task.done()
        for fut in gates[:2]:
            fut.set_result(None)
        for _ in range(20):                   # let the runner see the two acknowledgements
            await asyncio.sleep(0)
        assert dict(table) == {} and not task.done()      # one delivery still outstanding
        gates[2].set_result(None)
        await task
        assert dict(table) == {"x": 2, "y": 1}
        assert [(k, p) for _, k, _, p in table.log] == [("x", 0), ("y", 1)]
        assert runner.counts["in"] == 3 and runner.counts["out"] == 3 and runner.counts["batches"] == 1

    asyncio.run(main())


def test_a_refused_output_is_sent_again_and_state_waits_for_it():
    table = Table()
    staged = StagedState(table)
    attempts: list[bytes] = []

    async def main():
        loop = asyncio.get_running_loop()

        async def send(topic, key, value, partition):
            attempts.append(value)
            fut = loop.create_future()
            if value == b"x=2" and attempts.count(b"x=2") == 1:
                fut.set_exception(RuntimeError("broker refused"))   # only the first time
            else:
                fut.set_result(None)
            return fut

        runner = StageRunner("count", _counting_handler(staged), FakeSerdes(), send, state=staged,
                             retry_max_s=0.01)
        await runner.process_batch([Raw("in", 0, i, b"k", b"x") for i in range(2)])
        assert attempts == [b"x=1", b"x=2", b"x=1", b"x=2"]   # the whole batch again, same outputs
        assert dict(table) == {"x": 2}

    asyncio.run(main())


def test_an_error_mid_batch_keeps_none_of_its_state():
    table = Table()
    staged = StagedState(table)

    async def main():
        async def send(topic, key, value, partition):
            if value == b"x=2":
                raise RuntimeError("producer closed")
            return None

        runner = StageRunner("count", _counting_handler(staged), FakeSerdes(), send, state=staged)
        with pytest.raises(RuntimeError, match="closed"):
            await runner.process_batch([Raw("in", 0, i, b"k", b"x") for i in range(2)])
        assert dict(table) == {} and dict(staged) == {}   # record 1's write was not kept either

    asyncio.run(main())


def test_concurrent_stage_keeps_record_order_of_outputs():
    async def main():
        order = []
        fast_done = asyncio.Event()

        async def handle(event, key, partition, offset):
            if event == "slow":
                await fast_done.wait()        # finishes only once the later record has
            order.append(event)
            if event == "fast":
                fast_done.set()
            return Result([event])

        sent = []

        async def send(topic, key, value, partition):
            sent.append(value)

        runner = StageRunner("judge", handle, FakeSerdes(), send, concurrency=4)
        await runner.process_batch([Raw("in", 0, i, b"k", v) for i, v in enumerate([b"slow", b"fast"])])
        assert order == ["fast", "slow"]           # handled side by side
        assert sent == [b"slow", b"fast"]          # sent in the records' order

    asyncio.run(main())


def test_a_timer_does_not_ask_again_what_its_stage_has_not_handled_yet():
    from processors.stage import Requested

    now = [0.0]
    requested = Requested(hold_s=30.0, clock=lambda: now[0])
    assert requested.ask(b"s1", b"check t1")
    assert requested.ask(b"s2", b"check t2")
    now[0] = 1.0   # the next scan: both still wait on the control topic
    assert not requested.ask(b"s1", b"check t1") and not requested.ask(b"s2", b"check t2")
    assert requested.ask(b"s1", b"check t3")   # another request about the same key is its own
    requested.handled([(b"s1", b"check t1"), (b"other", b"x")])
    assert requested.ask(b"s1", b"check t1")   # handled: the next scan may ask again
    now[0] = 31.0   # s2's request was handled elsewhere (its partition moved): asked again after hold_s
    assert requested.ask(b"s2", b"check t2")
    assert not requested.ask(b"s2", b"check t2")
