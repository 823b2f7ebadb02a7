"""The engine over HTTP: `serving.server` in front of the local engine on the tiny model, and
`serving.remote.RemoteEngine` as its client, give the same tokens, logprobs, scores, versions
and errors as the engine used in-process; a bearer key guards it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr

from infra.errors import ConfigError, ContextLengthError, ServingError
from infra.settings import ServingSettings
from schemas.events import SamplingParams
from serving.engine import WeightsKind
from tests.conftest import wait_for

pytestmark = pytest.mark.asyncio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path):
    """(local engine, settings for a remote client) with the server running in a thread."""
    import uvicorn

    from serving.local import LocalEngine
    from serving.server import build_app

    port = free_port()
    settings = ServingSettings(port=port, api_key=SecretStr("s3cret"))
    engine = LocalEngine(settings, model_dir=tiny_model_dir)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, what="the engine server to start")
    yield engine, settings.model_copy(update={"engine": "remote", "engine_url": f"http://127.0.0.1:{port}"})
    server.should_exit = True
    thread.join(10)
    asyncio.run(engine.close())


async def test_remote_equals_local(served) -> None:
    from serving import create_engine

    local, settings = served
    remote = create_engine(settings)
    try:
        assert remote.name == "remote" and remote.info().max_context == local.info().max_context
        assert remote.info().details["tokenizer"] == str(local.model_dir)
        prompt = local.tokenizer.encode("over the wire")
        params = SamplingParams(temperature=0.8, max_new_tokens=10, seed=5)
        a, b = await local.generate(prompt, params), await remote.generate(prompt, params)
        assert a == b
        deltas = [d async for d in remote.stream(prompt, params)]
        assert [d.token_id for d in deltas] == a.token_ids and deltas[-1].finish_reason == a.finish_reason
        s_local = await local.score(prompt, a.token_ids, top_k=2)
        assert await remote.score(prompt, a.token_ids, top_k=2) == s_local
        # a grammar travels with the params: the remote answer is the local one, and JSON
        constrained = params.model_copy(update={"max_new_tokens": 16, "grammar": 'root ::= "{\\"ok\\": " ("true" | "false") "}"'})
        c = await remote.generate(prompt, constrained)
        assert c == await local.generate(prompt, constrained)
        assert json.loads(local.tokenizer.decode(c.token_ids[:-1]))["ok"] in (True, False)
    finally:
        await remote.close()


async def test_remote_errors_match(served) -> None:
    from serving.remote import RemoteEngine

    local, settings = served
    remote = RemoteEngine(settings)
    try:
        with pytest.raises(ContextLengthError, match="exceeds the model's context of 2048"):
            await remote.generate([5] * 2040, SamplingParams(max_new_tokens=100))
        with pytest.raises(ContextLengthError):
            async for _ in remote.stream([5] * 2040, SamplingParams(max_new_tokens=100)):
                pass
        with pytest.raises(ServingError, match="422|validation|Unprocessable|prompt_ids"):
            await remote.score([], [1])
        with pytest.raises(ServingError, match="reloader"):
            await remote.load_weights("/x", WeightsKind.FULL, 1)
    finally:
        await remote.close()
    with pytest.raises(ServingError, match="Unauthorized"):
        RemoteEngine(settings.model_copy(update={"api_key": SecretStr("wrong")}))


async def test_non_loopback_needs_a_key() -> None:
    from serving.server import build_app

    with pytest.raises(ConfigError, match="API_KEY"):
        build_app(object(), ServingSettings(host="0.0.0.0"))


class _ResettingEngineServer(threading.Thread):
    """Answers /info and /generate like `nextstate serve`, except that the connection of the
    first /generate is reset once its request has been read: what a client sees when the server
    closed an idle pooled connection just as the request went out."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.generates = 0

    def run(self) -> None:
        import json
        import struct

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                if head.startswith(b"POST /score"):   # a proxy's error page, say
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\n"
                                 b"connection: close\r\ncontent-length: 15\r\n\r\n<h1>oops</h1>\r\n")
                    continue
                if head.startswith(b"GET /info"):
                    answer = {"name": "local", "model": "m", "policy_version": 3, "max_context": 64}
                else:
                    self.generates += 1
                    if self.generates == 1:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        continue   # closed with a reset, nothing answered
                    n = json.loads(body)["params"]["max_new_tokens"]
                    answer = {"token_ids": [7] * n, "logprobs": [-1.0] * n, "finish_reason": "length",
                              "policy_version": 3, "prompt_tokens": 2}
                raw = json.dumps(answer).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(raw), raw))


async def test_a_request_reset_before_any_answer_is_sent_once_more_and_a_page_is_an_error() -> None:
    from serving.remote import RemoteEngine

    server = _ResettingEngineServer()
    server.start()
    remote = RemoteEngine(ServingSettings(engine="remote", engine_url=f"http://127.0.0.1:{server.port}"))
    try:
        assert remote.info().policy_version == 3
        gen = await remote.generate([1, 2], SamplingParams(max_new_tokens=4))
        assert gen.token_ids == [7] * 4 and remote.retried == 1 and server.generates == 2
        with pytest.raises(ServingError, match="answered 502 with no JSON"):
            await remote.score([1], [2])
    finally:
        await remote.close()
        server.sock.close()
