"""The real OpenClaw client against the gateway: `nextstate openclaw` writes its config, and
`openclaw agent --local` talks to the gateway twice in one conversation.

OpenClaw 2026.9.6 and the Node 24 it needs come from npm (infra/openclaw.sh, cached per
machine); the gateway serves the embedded SmolLM2-135M, whose context is 8,192 tokens, so the
config carries the small profile. What must hold, with the gateway restarted between the two
messages: both answered, two main turns of one session on Kafka, and the first turn's next
state is the second user message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from infra.settings import Settings
from producers.gateway.server import free_port
from tests.conftest import wait_for
from tests.processors.helpers import REPO, stop_process

KEY = "openclaw-test-" + uuid.uuid4().hex
pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture(scope="module")
def openclaw() -> Path:
    out = subprocess.run(["bash", str(REPO / "infra" / "openclaw.sh")], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"installing OpenClaw failed:\n{out.stderr[-3000:]}"
    return Path(out.stdout.strip().splitlines()[-1])


class Gateway:
    """`nextstate gateway` on the embedded default model, in its own process; restartable on
    the same port, spool and namespace."""

    def __init__(self, namespace: str, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "NEXTSTATE_KAFKA__NAMESPACE": namespace, "NEXTSTATE_GATEWAY__PORT": str(self.port),
                    "NEXTSTATE_GATEWAY__SPOOL_DIR": str(tmp_path / "spool"),
                    "NEXTSTATE_GATEWAY__API_KEYS": json.dumps({"openclaw": KEY}), "PYTHONPATH": str(REPO)}
        self.env.pop("NEXTSTATE_SERVING__MODEL", None)
        self.log = tmp_path / "gateway.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gateway":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "gateway"], cwd=REPO, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)

        def healthy() -> bool:
            assert self.proc.poll() is None, f"the gateway exited:\n{self.log.read_text()[-3000:]}"
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=300, interval=1, what="the gateway to serve")
        return self

    def stop(self) -> None:
        stop_process(self.proc, grace_s=60)


@pytest.fixture
def gateway(namespace: str, tmp_path: Path):
    gw = Gateway(namespace, tmp_path).start()
    yield gw
    gw.stop()


def _agent(launcher: Path, home: Path, session: str, message: str) -> dict:
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    out = subprocess.run([str(launcher), "agent", "--local", "--session-id", session, "--json",
                          "--message", message, "--timeout", "240"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=home)
    assert out.returncode == 0, f"openclaw agent failed ({out.returncode}):\n{out.stderr[-3000:]}"
    return json.loads(out.stdout)


def _visible(result: dict) -> str:
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            text = node.get("finalAssistantVisibleText")
            if isinstance(text, str):
                found.append(text)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(result)
    return found[0] if found else ""


def test_openclaw_talks_to_the_gateway_in_one_session_across_a_restart(openclaw, gateway, namespace, settings: Settings,
                                                       tmp_path: Path, workers) -> None:
    from infra.eventlog import read_log
    from schemas.events import TransitionFormed, TurnRecorded, TurnType

    home = tmp_path / "home"
    config = home / ".openclaw" / "openclaw.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    made = subprocess.run([sys.executable, "-m", "infra.cli", "openclaw", "--url", gateway.url, "--key", KEY,
                           "--write", str(config), "--max-tokens", "48"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    written = json.loads(config.read_text())
    [model] = written["models"]["providers"]["nextstate"]["models"]
    assert model["contextWindow"] == 8192 and model["maxTokens"] == 48
    assert written["tools"]["allow"] == ["read", "write", "edit", "exec"]   # the small profile

    session = "oc-" + uuid.uuid4().hex[:8]
    first = _agent(openclaw, home, session, "What is the capital of France? Answer in one sentence.")
    gateway.stop()   # a restart between the messages must not split the conversation
    gateway.start()
    second = _agent(openclaw, home, session, "And the capital of Germany?")
    assert _visible(first).strip() and _visible(second).strip()

    workers("sessionize")
    scoped = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"namespace": namespace})})

    def closed():
        log = [i.event for i in read_log(scoped, timeout=5.0)]
        mains = [e for e in log if isinstance(e, TurnRecorded) and e.turn_type is TurnType.MAIN]
        transitions = [e for e in log if isinstance(e, TransitionFormed)]
        return (mains, transitions) if len(mains) == 2 and transitions else None

    mains, transitions = wait_for(closed, timeout=120, interval=2, what="two main turns and a transition")
    assert len({t.session_id for t in mains}) == 1, [t.session_id for t in mains]
    assert sorted(t.turn_index for t in mains) == [0, 1]
    [transition] = [t for t in transitions if t.turn_index == 0]
    next_state = json.dumps(json.loads(transition.next_messages_json))
    assert "And the capital of Germany?" in next_state
    assert transition.next_turn_event_id == next(t.event_id for t in mains if t.turn_index == 1)
