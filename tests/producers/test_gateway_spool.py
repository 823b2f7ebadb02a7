"""The spool on its own (files only; its delivery to the real Kafka is in
test_gateway_kafka.py): order, durable drain position across reopen, torn tails, corrupt
lines kept aside, segment rotation, one process per spool."""

from __future__ import annotations

import pytest

from infra.errors import GatewayError
from producers.gateway.spool import Spool, decode, encode
from schemas.events import FeedbackKind, FeedbackReceived, SamplingParams, TurnRecorded, TurnType


def _turn(i: int) -> TurnRecorded:
    return TurnRecorded(tenant="acme", session_id="s", turn_index=i, turn_type=TurnType.MAIN,
                        request_id=f"r{i}", messages_json="[]", prompt_token_ids=[1, 2, i],
                        response_token_ids=[3, 4], response_logprobs=[-0.1, -2.5], response_text="é",
                        finish_reason="stop", sampling=SamplingParams(seed=i), policy_version=1,
                        engine="local", model="tiny")


def test_events_round_trip_exactly():
    t = _turn(3)
    back, key = decode(encode(t, "s"))
    assert back == t and key == "s"
    fb = FeedbackReceived(tenant="a", session_id="s", kind=FeedbackKind.THUMBS, thumbs=-1)
    assert decode(encode(fb, None)) == (fb, None)
    with pytest.raises(ValueError, match="checksum"):
        line = bytearray(encode(t, "s"))
        line[20] ^= 1
        decode(bytes(line))


def test_read_ack_and_reopen_resume_where_delivery_stopped(tmp_path):
    spool = Spool(tmp_path)
    spool.append([(_turn(i), "s") for i in range(5)])
    batch = spool.read(3)
    assert [b.event.turn_index for b in batch] == [0, 1, 2] and spool.depth == 5
    spool.ack(batch[-1].end, 3)
    spool.close()
    again = Spool(tmp_path)
    assert again.depth == 2 and [b.event.turn_index for b in again.read(10)] == [3, 4]
    again.close()


def test_a_torn_tail_is_cut_and_a_corrupt_line_is_kept_aside(tmp_path):
    spool = Spool(tmp_path)
    spool.append([(_turn(0), "s"), (_turn(1), "s")])
    spool.close()
    seg = next(tmp_path.glob("seg-*.log"))
    lines = seg.read_bytes().splitlines(keepends=True)
    damaged = lines[0][:30] + b"X" + lines[0][31:]
    seg.write_bytes(damaged + lines[1] + encode(_turn(2), "s")[:40])  # crash mid-write
    spool = Spool(tmp_path)
    assert seg.read_bytes().endswith(lines[1])  # the torn tail is gone
    assert [b.event.turn_index for b in spool.read(10)] == [1]
    assert (tmp_path / "corrupt.log").read_bytes() == damaged
    spool.close()


def test_segments_rotate_and_delivered_ones_are_deleted(tmp_path):
    spool = Spool(tmp_path, segment_bytes=4096)
    for i in range(12):
        spool.append([(_turn(i), "s")])
    assert len(list(tmp_path.glob("seg-*.log"))) > 1
    batch = spool.read(100)
    assert [b.event.turn_index for b in batch] == list(range(12))
    spool.ack(batch[-1].end, len(batch))
    assert spool.depth == 0 and len(list(tmp_path.glob("seg-*.log"))) == 1
    spool.append([(_turn(99), "s")])
    assert [b.event.turn_index for b in spool.read(10)] == [99]
    spool.close()


def test_one_process_per_spool(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(GatewayError, match="in use"):
        Spool(tmp_path)
    spool.close()
    Spool(tmp_path).close()


def test_concurrent_appends_share_fsyncs_and_lose_nothing(tmp_path, monkeypatch):
    import os
    import threading
    import time

    import producers.gateway.spool as spool_mod

    spool = Spool(tmp_path, segment_bytes=8192)
    synced_at_return: list[bool] = []
    real_fsync = os.fsync

    def slow_fsync(fd):   # a disk that takes a while: callers arrive during each fsync
        time.sleep(0.002)
        real_fsync(fd)

    monkeypatch.setattr(spool_mod.os, "fsync", slow_fsync)

    def client(c: int) -> None:
        for i in range(25):
            spool.append([(_turn(c * 1000 + i), f"s{c}")])
            synced_at_return.append(spool._synced >= 1)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert spool.appended == 200 and all(synced_at_return)
    assert spool._synced == spool._written == 200       # every write is covered by an fsync
    assert spool.fsyncs + spool.group_commits_joined == 200
    assert spool.fsyncs < 200 and spool.group_commits_joined > 0
    got = [b.event.turn_index for b in spool.read(1000)]
    assert sorted(got) == sorted(c * 1000 + i for c in range(8) for i in range(25))
    for c in range(8):   # each client's records in the order it appended them
        mine = [g for g in got if g // 1000 == c]
        assert mine == sorted(mine)
    assert len(list(tmp_path.glob("seg-*.log"))) > 1
    spool.close()
