"""Idle keep-alive connections and retried requests (the race that reset the demo's users).

A server closes an idle connection at the moment a client sends a request on it: the client
sees a reset although the server never started on the request. Our clients (infra.http) send
such a request once more on a fresh connection, and the gateway answers a repeated request id
with its first answer, so a retry is never recorded twice.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import socket
import struct
import time
import uuid

import httpx

from infra.http import RetryOnFreshConnection, async_client
from producers.gateway.server import ServerThread
from schemas.events import FeedbackReceived, TurnRecorded
from tests.producers.gateway_fixtures import engine, keyring, make_gateway, tokenizer  # noqa: F401
from tests.producers.helpers import KEYS

AUTH = {"Authorization": f"Bearer {KEYS['acme']}"}


def recorded(gw, kind=TurnRecorded) -> list:
    return [s.event for s in gw.spool.read(100_000) if isinstance(s.event, kind)]


def chat_body(text: str = "hi", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 2,
            "temperature": 0, **extra}


async def _resetting_server(answered: list[int]) -> asyncio.AbstractServer:
    """A server whose first connection reads the request and resets (what a client sees when
    the server closed an idle connection as the request went out); later ones answer 200."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if connections == 1:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            writer.close()
            return
        answered.append(connections)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_a_request_reset_before_any_answer_is_sent_once_more_on_a_fresh_connection():
    async def run() -> tuple[int, int, list[int], type | None]:
        answered: list[int] = []
        server = await _resetting_server(answered)
        port = server.sockets[0].getsockname()[1]
        transport = RetryOnFreshConnection()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", transport=transport) as c:
            status = (await c.post("/x", json={"a": 1})).status_code
        # Without the retry the same server fails the request.
        answered_plain: list[int] = []
        plain_server = await _resetting_server(answered_plain)
        plain_port = plain_server.sockets[0].getsockname()[1]
        error = None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{plain_port}") as c:
            try:
                await c.post("/x", json={"a": 1})
            except httpx.TransportError as exc:
                error = type(exc)
        server.close()
        plain_server.close()
        return status, transport.retried, answered, error

    status, retried, answered, plain_error = asyncio.run(run())
    assert status == 200 and retried == 1 and answered == [2]
    assert plain_error is not None and issubclass(plain_error, (httpx.ReadError, httpx.RemoteProtocolError))


def test_users_idle_at_the_keep_alive_boundary_lose_nothing_and_each_turn_is_recorded_once(make_gateway, engine):
    # The demo's race, made frequent: the gateway closes idle connections after 0.3 s and the
    # client's pool keeps them exactly as long (as httpx's 5 s pool met uvicorn's 5 s default),
    # and 16 users each go idle for 0.3 s, give or take a few milliseconds, between requests.
    keep_alive = 0.3
    gw = make_gateway(engine, keep_alive_timeout_s=keep_alive)
    sent: list[str] = []
    failures: list[str] = []

    async def run(url: str) -> int:
        client = async_client(url, headers=AUTH, timeout=60)
        transport = client._transport
        transport.pools = [httpx.AsyncHTTPTransport(limits=httpx.Limits(keepalive_expiry=keep_alive))
                           for _ in transport.pools]

        async def user(i: int) -> None:
            rng = random.Random(i)
            for n in range(12):
                await asyncio.sleep(keep_alive + rng.uniform(-0.004, 0.002))
                rid = uuid.uuid4().hex
                try:
                    r = await client.post("/v1/chat/completions", json=chat_body(f"user {i} says {n}"),
                                          headers={"X-Request-Id": rid, "X-Session-Id": f"s{i}"})
                    r.raise_for_status()
                    assert r.headers["x-request-id"] == rid
                    sent.append(rid)
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

        try:
            await asyncio.gather(*(user(i) for i in range(16)))
        finally:
            await client.aclose()
        return client._transport.retried

    with ServerThread(gw) as server:
        retried = asyncio.run(run(server.url))
    assert failures == []
    ids = [t.request_id for t in recorded(gw)]
    assert sorted(ids) == sorted(sent) and len(set(ids)) == len(sent) == 16 * 12
    print(f"requests retried on a fresh connection: {retried} of {len(sent)}")


def test_a_repeated_request_id_gets_the_first_answer_and_is_recorded_once(make_gateway, engine):
    gw = make_gateway(engine)
    own: list[float] = []
    gw.metrics.own_listeners.append(own.append)
    with ServerThread(gw) as server, httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        rid = uuid.uuid4().hex
        first = c.post("/v1/chat/completions", json=chat_body(temperature=1.0), headers={"X-Request-Id": rid})
        again = c.post("/v1/chat/completions", json=chat_body(temperature=1.0), headers={"X-Request-Id": rid})
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers["x-replayed"] == "true"
        assert "x-replayed" not in first.headers
        assert len(own) == 1   # a replay is no work of the gateway's own: not in the metric
        # Idempotency-Key works the same; the same id in another tenant is another request.
        key = uuid.uuid4().hex
        a = c.post("/v1/chat/completions", json=chat_body(), headers={"Idempotency-Key": key})
        b = c.post("/v1/chat/completions", json=chat_body(), headers={"Idempotency-Key": key})
        other = c.post("/v1/chat/completions", json=chat_body(), headers={
            "Idempotency-Key": key, "Authorization": f"Bearer {KEYS['globex']}"})
        assert a.json() == b.json() and "x-replayed" not in other.headers
        # A reused id with another body is the client's bug; a streamed id is not replayed.
        reused = c.post("/v1/chat/completions", json=chat_body("something else"), headers={"X-Request-Id": rid})
        assert reused.status_code == 422 and reused.json()["error"]["code"] == "request_id_reused"
        sid = uuid.uuid4().hex
        streamed = c.post("/v1/chat/completions", json=chat_body(stream=True), headers={"X-Request-Id": sid})
        assert streamed.status_code == 200 and "data:" in streamed.text
        twice = c.post("/v1/chat/completions", json=chat_body(stream=True), headers={"X-Request-Id": sid})
        assert twice.status_code == 409 and "stream" in twice.json()["error"]["message"]
        bad = c.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "no spaces/slashes"})
        assert bad.status_code == 400 and "x-request-id" in bad.json()["error"]["message"]
        # Feedback and session ends too: a retried POST records one event.
        fid = uuid.uuid4().hex
        fb = {"session_id": "s-fb", "kind": "thumbs", "thumbs": True}
        f1 = c.post("/v1/feedback", json=fb, headers={"X-Request-Id": fid})
        f2 = c.post("/v1/feedback", json=fb, headers={"X-Request-Id": fid})
        assert f1.json() == f2.json()
    turns = recorded(gw)
    assert [t.request_id for t in turns].count(rid) == 1 and [t.request_id for t in turns].count(key) == 2
    assert [t.request_id for t in turns].count(sid) == 1
    assert len(turns) == 4   # rid, key (acme), key (globex), the stream: nothing twice
    assert [e.event_id for e in recorded(gw, FeedbackReceived)].count(f1.json()["event_id"]) == 1


def test_concurrent_retries_of_one_request_wait_for_it_and_record_it_once(make_gateway, engine):
    gw = make_gateway(engine)

    async def run(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
            rid = uuid.uuid4().hex
            body = chat_body("one question", max_tokens=16, temperature=1.0)
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body, headers={"X-Request-Id": rid})
                                          for _ in range(4)))

    with ServerThread(gw) as server:
        answers = asyncio.run(run(server.url))
    assert {json.dumps(a.json(), sort_keys=True) for a in answers} == {json.dumps(answers[0].json(), sort_keys=True)}
    assert sum(a.headers.get("x-replayed") == "true" for a in answers) == 3
    assert len(recorded(gw)) == 1


def test_the_gateway_keeps_an_idle_connection_longer_than_client_pools_do(make_gateway, engine):
    # uvicorn's default (5 s) would have closed it; the gateway keeps it past httpx's 5 s.
    gw = make_gateway(engine)
    assert gw.settings.keep_alive_timeout_s > 5
    with ServerThread(gw) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() and conn.sock is not None
        sock = conn.sock
        time.sleep(5.5)
        conn.request("GET", "/healthz")   # on the same socket: a closed one fails here
        response = conn.getresponse()
        assert response.status == 200 and conn.sock is sock
        conn.close()
