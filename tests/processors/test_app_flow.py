"""processors.app.StageApp: input records faust throws out of its queues are read again."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from faust.types import TP

from processors.app import StageApp
from processors.order import OffsetOrder, Verdict


def queued(tp: TP, offset: int) -> SimpleNamespace:
    """What faust's stream queues hold: an event with its Kafka message."""
    return SimpleNamespace(message=SimpleNamespace(tp=tp, offset=offset))


def test_resuming_the_flow_reads_the_emptied_input_records_again(tmp_path):
    async def main() -> None:
        app = StageApp("t-flow", broker="kafka://127.0.0.1:1", store="memory://", datadir=str(tmp_path),
                       autodiscover=False, web_enabled=False)
        turns, feedback, changelog = TP("ns.turns", 2), TP("ns.feedback", 2), TP("ns.x-changelog", 0)
        app.stream_topics = frozenset({"ns.turns", "ns.feedback"})
        app.order = OffsetOrder()
        for tp in (turns, feedback):
            app.order.seeked(tp, 0)
        assert [app.order.admit(feedback, o) for o in (0, 1)] == [Verdict.DELIVER] * 2
        assert [app.order.admit(turns, o) for o in range(4)] == [Verdict.DELIVER] * 4
        seeks = []

        async def seek(tp: TP, offset: int) -> None:
            seeks.append((tp, offset))

        app._read_again = seek
        agent_queue = app.FlowControlQueue(maxsize=10, clear_on_resume=True)
        other_queue = app.FlowControlQueue(maxsize=10, clear_on_resume=True)
        # the agent took turns 0 and 1; 2, 3 and both feedback records still wait in queues
        for item in (queued(feedback, 0), queued(turns, 2), queued(feedback, 1), queued(turns, 3)):
            agent_queue.put_nowait(item)
        other_queue.put_nowait(queued(changelog, 7))      # not an input: faust's own business
        other_queue.put_nowait(SimpleNamespace(value=1))  # not a record at all
        app.flow_control.resume()                         # what the end of a recovery does
        await asyncio.sleep(0)
        assert agent_queue.empty() and other_queue.empty()
        assert sorted(seeks) == sorted([(feedback, 0), (turns, 2)])
        assert app.order.expected[feedback] == 0 and app.order.expected[turns] == 2
        assert app.order.admit(turns, 3) is Verdict.REWIND
        assert app.order.counts["dropped"] == 2
        app.flow_control.clear()                          # nothing queued: nothing to read again
        await asyncio.sleep(0)
        assert len(seeks) == 2

    asyncio.run(main())
