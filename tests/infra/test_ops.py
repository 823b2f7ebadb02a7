"""The ops view against the real log: the index follows a namespace, the API needs a key,
and headless Chromium renders sessions, reward decisions and curves (screenshot saved)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading

import httpx
import pytest
import uvicorn

from infra.cli.ops import ops_app
from infra.kafka import EventProducer
from infra.settings import load_settings
from tests.conftest import wait_for
from tests.schemas.examples import examples

pytestmark = pytest.mark.stack
KEY = "ops-test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ops_server(stack, registry, namespace):
    settings = load_settings(gateway={"api_keys": {"acme": KEY}})
    producer = EventProducer(settings.kafka, registry, namespace)
    for e in examples("sess-ops-1").values():
        producer.send(e, key="sess-ops-1")
    producer.flush()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(ops_app(settings, namespace), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, what="ops server start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_api_needs_a_key_and_reflects_the_log(ops_server):
    assert httpx.get(f"{ops_server}/ops/api/summary").status_code == 401
    assert httpx.get(f"{ops_server}/ops/", auth=("x", "wrong")).status_code == 401
    get = lambda: httpx.get(f"{ops_server}/ops/api/summary", headers={"Authorization": f"Bearer {KEY}"}).json()
    # every topic the examples went to is read on its own: wait until each has been seen
    summary = wait_for(lambda: (d := get())["counts"]["CheckpointPublished"] and d["dead_letters"]
                       and d["judgements"] and d["sessions"] and d, 30, what="index caught up")
    assert summary["sessions"][0]["session_id"] == "sess-ops-1"
    assert summary["sessions"][0]["reward_mean"] == -1
    assert summary["judgements"][0]["votes"] == [-1, None]
    assert summary["checkpoints"][0]["metrics"]["loss"] == 0.25
    assert summary["dead_letters"][0]["stage"] == "judge"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_page_renders_in_headless_chromium(ops_server, tmp_path):
    wait_for(lambda: httpx.get(f"{ops_server}/ops/api/summary", auth=("ops", KEY)).json()["counts"]["CheckpointPublished"],
             30, what="index caught up")
    url = ops_server.replace("http://", f"http://ops:{KEY}@") + "/ops/"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000",
             "--window-size=1280,1100"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert "sess-ops-1" in dom.stdout, dom.stderr[-2000:]
    assert "no judgements yet" not in dom.stdout and "<path" in dom.stdout
    shot = tmp_path / "ops.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    keep = __import__("pathlib").Path(__file__).resolve().parents[2] / "out"
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / "ops-page.png")
