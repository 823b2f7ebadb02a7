"""learner.sources.PrefetchingSource: reads ahead in a thread without changing what the
learner sees: the same records in the same order, `at_end` only once nothing is held."""

from __future__ import annotations

import time

import pytest

from learner.sources import Fed, MemorySampleSource, PrefetchingSource
from tests.conftest import wait_for
from tests.learner.samples import make_sample


def drain(source, n_max=10_000, timeout=0.5):
    out = []
    while len(out) < n_max:
        fed = source.poll(timeout)
        if fed is None:
            break
        out.append(fed)
    return out


def test_same_records_in_the_same_order_and_at_end_after_the_last():
    samples = [make_sample(i) for i in range(40)]
    source = PrefetchingSource(MemorySampleSource(samples), depth=8)
    try:
        assert source.start_positions() == {("memory", 0): 0}
        first = source.poll(2.0)
        assert first.offset == 0 and first.sample.event_id == samples[0].event_id
        assert not source.at_end()          # 39 left, 8 of them held here at most
        rest = drain(source)
        assert [f.offset for f in [first, *rest]] == list(range(40))
        assert source.at_end()
        assert source.poll(0.05) is None
    finally:
        source.close()


class Slow(MemorySampleSource):
    """Polls that take a while: a record can be on its way from the source to the queue."""

    def poll(self, timeout: float) -> Fed | None:
        time.sleep(0.05)
        return super().poll(timeout)


def test_at_end_waits_for_a_record_on_its_way():
    source = PrefetchingSource(Slow([make_sample(0)]), depth=4)
    try:
        # right after start the only record is being read: the inner source already says
        # "at end", but the record is not handed out yet, so this source must not
        assert not source.at_end()
        assert source.poll(2.0).offset == 0
        assert source.at_end()
    finally:
        source.close()


class Broken(MemorySampleSource):
    def poll(self, timeout: float) -> Fed | None:
        raise RuntimeError("broker gone")


def test_an_error_of_the_reader_reaches_the_trainer():
    source = PrefetchingSource(Broken([]), depth=4)
    try:
        wait_for(lambda: source._error is not None, timeout=5, what="the reader to fail")
        with pytest.raises(RuntimeError, match="broker gone"):
            source.poll(0.05)
    finally:
        source.close()


def test_close_stops_the_reader_even_when_the_queue_is_full():
    source = PrefetchingSource(MemorySampleSource([make_sample(i) for i in range(20)]), depth=2)
    wait_for(lambda: source._queue.full(), timeout=5, what="the queue to fill")
    source.close()
    assert not source._thread.is_alive()


class PollsAndCommits(Slow):
    """librdkafka's synchronous commit hangs while another thread polls the same consumer:
    the source must never see a commit during a poll."""

    def __init__(self, samples):
        super().__init__(samples)
        self.polling = False
        self.commits_during_poll = 0
        self.commits = 0

    def poll(self, timeout: float) -> Fed | None:
        self.polling = True
        try:
            return super().poll(timeout)
        finally:
            self.polling = False

    def commit(self, offsets) -> None:
        self.commits += 1
        self.commits_during_poll += self.polling


def test_commits_never_run_beside_a_poll_even_with_a_full_queue():
    inner = PollsAndCommits([make_sample(i) for i in range(12)])
    source = PrefetchingSource(inner, depth=2)
    try:
        wait_for(lambda: source._queue.full(), timeout=5, what="the queue to fill")
        for _ in range(20):
            source.commit([])
            source.poll(0.01)
        assert inner.commits == 20 and inner.commits_during_poll == 0
    finally:
        source.close()
