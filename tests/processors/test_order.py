"""processors.order.OffsetOrder: each input partition's records once each, in offset order."""

from __future__ import annotations

from processors.order import OffsetOrder, UnfilteredReadOffsets, Verdict


def test_records_in_order_are_handed_on_and_repeats_dropped():
    order = OffsetOrder()
    order.seeked("t0", 10)
    assert [order.admit("t0", o) for o in (10, 11, 12)] == [Verdict.DELIVER] * 3
    # faust re-fetched from an older position without a seek we saw: already handed on
    assert [order.admit("t0", o) for o in (10, 11, 12)] == [Verdict.REPEAT] * 3
    assert order.admit("t0", 13) is Verdict.DELIVER
    assert order.expected["t0"] == 14


def test_a_record_ahead_of_its_predecessors_rewinds_until_they_come():
    """The soak's case: records fetched before a rebalance were dropped, the consumer went on
    from where they had moved it, and a later turn arrived before the earlier ones."""
    order = OffsetOrder()
    order.seeked("t0", 100)
    assert order.admit("t0", 105) is Verdict.REWIND      # 100..104 not handed on yet
    assert order.admit("t0", 106) is Verdict.REWIND      # the rest of the stale fetch
    assert order.expected["t0"] == 100                  # still waiting for 100
    assert [order.admit("t0", o) for o in range(100, 107)] == [Verdict.DELIVER] * 7
    assert order.counts["rewind"] == 2 and order.counts["deliver"] == 7


def test_a_real_hole_in_the_log_is_passed_after_one_rewind():
    """Offsets that do not exist (transaction markers, compaction): the rewind reads the same
    record first again, so the hole is real and the partition goes on."""
    order = OffsetOrder()
    order.seeked("t0", 5)
    assert order.admit("t0", 5) is Verdict.DELIVER
    assert order.admit("t0", 8) is Verdict.REWIND        # 6, 7 missing: maybe skipped
    assert order.admit("t0", 9) is Verdict.REWIND        # stale, from the fetch in hand
    assert order.admit("t0", 8) is Verdict.GAP           # the lowest of them first again: a hole
    assert order.admit("t0", 9) is Verdict.DELIVER


def test_a_seek_resets_the_partition_and_partitions_are_apart():
    order = OffsetOrder()
    order.seeked("t0", 3)
    order.seeked("t1", 40)
    assert order.admit("t1", 40) is Verdict.DELIVER
    assert order.admit("t0", 3) is Verdict.DELIVER
    assert order.admit("t0", 9) is Verdict.REWIND
    order.seeked("t0", 2)                               # a rebalance: back to the committed offset
    assert order.admit("t0", 2) is Verdict.DELIVER      # re-read: derived ids make it harmless
    assert order.admit("t1", 41) is Verdict.DELIVER


def test_faust_read_offsets_are_off_for_inputs_only():
    class TP:
        def __init__(self, topic):
            self.topic = topic

    inputs = frozenset({"turns"})
    offsets = UnfilteredReadOffsets(lambda: inputs)
    turns, changelog = TP("turns"), TP("changelog")
    offsets[turns], offsets[changelog] = 7, 9
    assert offsets[turns] is None and offsets[changelog] == 9
    assert offsets[TP("other")] is None                 # a default, as faust's defaultdict gives
    offsets.update({turns: 1})
    assert offsets.pop(turns) == 1


def test_a_delivery_that_never_happened_is_expected_again():
    order = OffsetOrder()
    order.seeked("t0", 0)
    assert order.admit("t0", 0) is Verdict.DELIVER
    assert order.admit("t0", 1) is Verdict.DELIVER
    order.undo("t0", 1)                                 # offset 1's delivery was cancelled
    assert order.admit("t0", 2) is Verdict.REWIND       # so 2 may not go before it
    assert order.admit("t0", 1) is Verdict.DELIVER
    order.seeked("t0", 7)
    order.undo("t0", 1)                                 # a seek since: nothing to undo
    assert order.expected["t0"] == 7


def test_a_never_committed_partition_reads_from_offset_0_whatever_comes_first():
    """A worker restarted before its first commit: offset 0 was fetched before the seek to the
    start, handed to faust and dropped with faust's queues; offsets 1 and 2 of that old fetch
    still come after the seek, before the fresh fetch from the start. Taking the first record
    for the start lost offset 0 (a SESSION_END never read)."""
    order = OffsetOrder()
    assert order.admit("f1", 0) is Verdict.DELIVER      # before any seek: faust drops it
    order.seeked("f1", 0)                               # never committed: the log's start
    assert order.admit("f1", 1) is Verdict.REWIND       # stale, from the fetch before the seek
    assert order.admit("f1", 2) is Verdict.REWIND
    assert [order.admit("f1", o) for o in (0, 1, 2)] == [Verdict.DELIVER] * 3


def test_a_never_committed_log_whose_head_was_deleted_goes_on_from_its_first_record():
    """Retention deleted offsets 0..11: the seek to 0 lands on 12 twice, which is a hole."""
    order = OffsetOrder()
    order.seeked("f1", 0)
    assert order.admit("f1", 12) is Verdict.REWIND
    assert order.admit("f1", 12) is Verdict.GAP
    assert order.admit("f1", 13) is Verdict.DELIVER


def test_a_hole_is_found_when_the_stale_batch_and_the_fetch_after_the_seek_hold_many_records():
    """Every record of a stale batch rewinds; the first one read after the seek is compared with
    the lowest of them, so a hole is passed however many records each fetch returns."""
    order = OffsetOrder()
    order.seeked("f1", 0)                               # retention deleted 0..11
    assert {order.admit("f1", o) for o in range(12, 40)} == {Verdict.REWIND}
    assert order.admit("f1", 12) is Verdict.GAP         # the fetch after the seek starts at 12 again
    assert [order.admit("f1", o) for o in range(13, 40)] == [Verdict.DELIVER] * 27
    order.seeked("f1", 50)
    assert {order.admit("f1", o) for o in (55, 56, 57)} == {Verdict.REWIND}
    assert [order.admit("f1", o) for o in range(50, 58)] == [Verdict.DELIVER] * 8   # no hole: all come


def test_records_dropped_from_faust_queues_are_expected_again():
    """A restarted worker's recovery seeks to the start, then resumes faust's flow control,
    which empties the queues: offset 0, admitted after the seek, was thrown away there while
    1 and 2, fetched later, were handed on (a SESSION_END never read)."""
    order = OffsetOrder()
    order.seeked("f2", 0)
    assert order.admit("f2", 0) is Verdict.DELIVER      # queued, then emptied by faust
    assert order.dropped("f2", 0)
    assert order.admit("f2", 1) is Verdict.REWIND       # 1 may not go before it
    assert [order.admit("f2", o) for o in (0, 1, 2)] == [Verdict.DELIVER] * 3
    assert not order.dropped("f2", 5)                   # not admitted yet: nothing to read again
    assert not order.dropped("other", 0)                # never seeked: the seek will set it
    assert order.expected["f2"] == 3 and order.counts["dropped"] == 1
