"""The gateway with the real Kafka and schema registry: turns and feedback arrive in the test's
namespace; session ends (header, endpoint, idle timeout) become SESSION_END; with Kafka
unreachable every request is still answered and exactly those turns arrive once it is back;
a restarted gateway drains what the previous one spooled.

The shared broker is never stopped: "Kafka down" is a producer pointed at a port where no
broker listens, then pointed back (the drainer builds a fresh producer after each failure).
"""

from __future__ import annotations

import json
import httpx
import openai
import pytest

from producers.gateway.server import ServerThread, free_port, kafka_producer_factory
from schemas.events import FeedbackKind, FeedbackReceived, TurnRecorded, TurnType
from tests.conftest import wait_for
from tests.producers.gateway_fixtures import engine, keyring, make_gateway, tokenizer  # noqa: F401
from tests.producers.helpers import KEYS, read_events

pytestmark = pytest.mark.stack

NAMES = ["TurnRecorded", "FeedbackReceived"]


def _client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["acme"], max_retries=0, timeout=60)


def _ask(c: openai.OpenAI, text: str, **headers: str):
    return c.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": text}], max_tokens=6,
        extra_headers=headers or None)


def test_turns_feedback_and_session_ends_reach_kafka(settings, registry, namespace, make_gateway, engine):
    gw = make_gateway(engine, namespace=namespace, drain=True, session_idle_timeout_s=1.0)
    auth = {"Authorization": f"Bearer {KEYS['acme']}"}
    with ServerThread(gw) as server:
        c = _client(server)
        _ask(c, "one", **{"X-Session-Id": "s-a"})
        _ask(c, "heartbeat", **{"X-Session-Id": "s-a", "X-Turn-Type": "side"})
        _ask(c, "two", **{"X-Session-Id": "s-a", "X-Session-Done": "1"})
        fb = httpx.post(f"{server.url}/v1/feedback", headers=auth,
                        json={"session_id": "s-a", "kind": "thumbs", "thumbs": -1, "turn_index": 0})
        assert fb.status_code == 200
        bad = httpx.post(f"{server.url}/v1/feedback", headers=auth,
                         json={"session_id": "s-a", "kind": "outcome_reward", "reward": 3})
        assert bad.status_code == 400 and "reward" in bad.json()["error"]["message"]
        _ask(c, "b", **{"X-Session-Id": "s-b"})
        end = httpx.post(f"{server.url}/v1/sessions/s-b/end", headers=auth)
        assert end.status_code == 200 and end.json()["known"] is True
        _ask(c, "idle", **{"X-Session-Id": "s-c"})  # ends by the 1 s idle timeout
        wait_for(lambda: gw.drainer.delivered >= 9, timeout=60, what="9 events delivered")
    events = read_events(settings, registry, namespace, NAMES, expect=9)
    turns = sorted((e for e in events if isinstance(e, TurnRecorded)), key=lambda e: (e.session_id, e.turn_index))
    assert [(t.session_id, t.turn_index, t.turn_type) for t in turns] == [
        ("s-a", 0, TurnType.MAIN), ("s-a", 1, TurnType.SIDE), ("s-a", 2, TurnType.MAIN),
        ("s-b", 0, TurnType.MAIN), ("s-c", 0, TurnType.MAIN)]
    feedback = [e for e in events if isinstance(e, FeedbackReceived)]
    ends = {e.session_id: e for e in feedback if e.kind is FeedbackKind.SESSION_END}
    assert set(ends) == {"s-a", "s-b", "s-c"}
    assert ends["s-a"].turn_index == 2 and '"client_done"' in ends["s-a"].metadata_json
    assert '"idle_timeout"' in ends["s-c"].metadata_json
    [thumbs] = [e for e in feedback if e.kind is FeedbackKind.THUMBS]
    assert thumbs.thumbs == -1 and thumbs.turn_index == 0 and thumbs.tenant == "acme"


def test_kafka_down_every_request_answered_then_exactly_n_turns_arrive(settings, registry, namespace,
                                                                        make_gateway, engine):
    target = {"bootstrap": f"127.0.0.1:{free_port()}"}  # nothing listens there

    def factory():
        return kafka_producer_factory(settings, namespace, target["bootstrap"])()

    gw = make_gateway(engine, namespace=namespace, drain=True, producer_factory=factory,
                      delivery_timeout_s=1.5)
    n = 6
    with ServerThread(gw) as server:
        c = _client(server)
        for i in range(n):
            assert _ask(c, f"while kafka is down {i}").http_response.status_code == 200
        wait_for(lambda: gw.drainer.failures >= 1, timeout=30, what="a failed delivery attempt")
        assert gw.spool.depth == n and gw.drainer.delivered == 0
        target["bootstrap"] = settings.kafka.bootstrap_servers  # Kafka is back
        wait_for(lambda: gw.spool.depth == 0, timeout=90, what="the spool to drain")
    events = read_events(settings, registry, namespace, ["TurnRecorded"], expect=n, settle_s=3.0)
    assert len(events) == n and len({e.event_id for e in events}) == n
    assert all(len(e.response_token_ids) == len(e.response_logprobs) > 0 for e in events)
    assert sorted(e.turn_index for e in events) == [0] * n  # six one-turn conversations


def test_a_restarted_gateway_drains_what_the_previous_one_spooled(settings, registry, namespace,
                                                                  make_gateway, engine, tmp_path):
    spool_dir = tmp_path / "shared-spool"
    first = make_gateway(engine, drain=False, spool_dir=spool_dir)  # as if Kafka never answered
    with ServerThread(first) as server:
        for i in range(3):
            _ask(_client(server), f"before restart {i}", **{"X-Session-Id": "s-r"})
    first.spool.close()
    assert (spool_dir / "position.json").exists() is False  # nothing was ever delivered
    second = make_gateway(engine, namespace=namespace, drain=True, spool_dir=spool_dir)
    assert second.spool.depth == 3
    with ServerThread(second):
        wait_for(lambda: second.spool.depth == 0, timeout=60, what="the old spool to drain")
    second.spool.close()
    events = read_events(settings, registry, namespace, ["TurnRecorded"], expect=3, settle_s=2.0)
    assert sorted(e.turn_index for e in events) == [0, 1, 2] and {e.session_id for e in events} == {"s-r"}


@pytest.mark.parametrize("where", ["client", "broker"])
def test_a_record_kafka_refuses_for_good_is_set_aside_and_the_rest_flow(settings, registry, namespace, tmp_path,
                                                                         where):
    """client: the producer's own size limit refuses it at send; broker: the topic's limit
    (kafka.max_message_bytes) refuses it on delivery, and the batch is retried record by record."""
    from producers.gateway.spool import Spool, SpoolDrainer, decode
    from schemas.events import DeadLettered, SamplingParams, TurnType

    def turn(i: int, text: str) -> TurnRecorded:
        return TurnRecorded(tenant="acme", session_id="s-poison", turn_index=i, turn_type=TurnType.MAIN,
                            request_id=f"r{i}", messages_json=json.dumps([{"role": "user", "content": text}]),
                            prompt_token_ids=[1, 2], response_token_ids=[3], response_logprobs=[-0.5],
                            response_text="ok", finish_reason="stop", sampling=SamplingParams(),
                            policy_version=0, engine="local", model="tiny")

    spool = Spool(tmp_path / "spool")
    limit = 200_000 if where == "client" else 4 * settings.kafka.max_message_bytes
    size = 300_000 if where == "client" else settings.kafka.max_message_bytes + 500_000
    huge = turn(1, "x" * size)
    spool.append([(turn(0, "before"), "s-poison"), (huge, "s-poison"), (turn(2, "after"), "s-poison")])
    factory = kafka_producer_factory(settings, namespace)

    def small_limit():
        producer = factory()
        producer._producer = type(producer._producer)({**settings.kafka.client_config(),
                                                       "enable.idempotence": True, "acks": "all",
                                                       "message.max.bytes": limit})
        return producer

    drainer = SpoolDrainer(spool, small_limit, flush_timeout_s=10).start()
    try:
        wait_for(lambda: spool.depth == 0, timeout=60, what="the spool drained past the refused record")
    finally:
        drainer.stop()
    assert drainer.set_aside == 1 and drainer.delivered == 2
    reason, line = (tmp_path / "spool" / "set-aside.log").read_bytes().split(b"\t", 1)
    assert b"MSG_SIZE_TOO_LARGE" in reason
    assert decode(line)[0] == huge                          # the whole record, kept
    turns = read_events(settings, registry, namespace, ["TurnRecorded"], expect=2, settle_s=2.0)
    # the broker's refusal fails the whole batch: what it had taken is sent again, same ids
    assert sorted({t.event_id: t.turn_index for t in turns}.values()) == [0, 2]
    if where == "client":
        assert len(turns) == 2
    [letter] = read_events(settings, registry, namespace, ["DeadLettered"], expect=1)
    assert isinstance(letter, DeadLettered) and letter.stage == "gateway-spool"
    assert letter.parent_ids == [huge.event_id] and "set-aside.log" in letter.error
    spool.close()
