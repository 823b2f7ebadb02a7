"""Builders of test events and a handle on a stage worker subprocess, shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from schemas.events import (
    FeedbackKind,
    FeedbackReceived,
    NextStateKind,
    SamplingParams,
    TransitionFormed,
    TurnRecorded,
    TurnType,
)

REPO = Path(__file__).resolve().parents[2]


def turn(session: str, index: int, messages: list[dict], response: str = "ok", n: int = 4,
         turn_type: TurnType = TurnType.MAIN, **kw) -> TurnRecorded:
    fields = dict(
        tenant="test", session_id=session, turn_index=index, turn_type=turn_type,
        request_id=str(uuid.uuid4()), messages_json=json.dumps(messages),
        prompt_token_ids=list(range(10, 10 + 6 + index)), response_token_ids=list(range(100, 100 + n)),
        response_logprobs=[-0.5] * n, response_text=response, finish_reason="stop",
        sampling=SamplingParams(), policy_version=1, engine="local", model="tiny",
    )
    fields.update(kw)
    return TurnRecorded(**fields)


def feedback(session: str, kind: FeedbackKind, turn_index: int | None = None, **kw) -> FeedbackReceived:
    return FeedbackReceived(tenant="test", session_id=session, turn_index=turn_index, kind=kind, **kw)


def transition(next_user: str | None = None, fb: list[FeedbackReceived] | None = None,
               kind: NextStateKind = NextStateKind.NEXT_TURN, **turn_kw) -> TransitionFormed:
    session = turn_kw.pop("session", str(uuid.uuid4()))
    t = turn(session, 0, [{"role": "user", "content": "write hello world in python"}],
             response="print('hello world')", **turn_kw)
    nxt = [{"role": "user", "content": next_user}] if next_user is not None else []
    return TransitionFormed(tenant="test", session_id=session, turn_index=0, turn=t,
                            next_state_kind=kind, next_messages_json=json.dumps(nxt),
                            feedback=fb or [])


def conversation(session: str, turns: int, n: int = 4) -> list[TurnRecorded]:
    """`turns` main turns of one session, each sending the whole history so far."""
    msgs: list[dict] = [{"role": "user", "content": f"task of {session}"}]
    out = []
    for i in range(turns):
        out.append(turn(session, i, list(msgs), response=f"answer {i}", n=n))
        msgs += [{"role": "assistant", "content": f"answer {i}"},
                 {"role": "tool", "content": f"tool result {i}a"},
                 {"role": "tool", "content": f"tool result {i}b"},
                 {"role": "user", "content": f"thanks, now step {i + 1}"}]
    return out


def stop_process(proc: subprocess.Popen | None, grace_s: float = 30.0) -> None:
    """SIGTERM a test's subprocess, SIGKILL it if it is still running after `grace_s`."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


class StageProcess:
    """`nextstate process <stage>` in a subprocess, with per-test faust data and settings."""

    def __init__(self, stage: str, namespace: str, data_dir: Path, log: Path, **env: str) -> None:
        self.args = [sys.executable, "-m", "infra.cli", "process", stage, "--namespace", namespace,
                     "--loglevel", os.environ.get("NEXTSTATE_TEST_STAGE_LOGLEVEL", "info")]
        self.env = {**os.environ, "NEXTSTATE_PROCESSORS__FAUST_DATA_DIR": str(data_dir),
                    "NEXTSTATE_PROCESSORS__SESSION_TIMEOUT_S": "6",
                    "PYTHONPATH": str(REPO), **env}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StageProcess":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        stop_process(self.proc)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


class Collector:
    """Reads every event of some topics of a namespace (own group, from the beginning)."""

    def __init__(self, settings, registry, namespace: str, *event_names: str) -> None:
        from infra.kafka import EventConsumer

        self.consumer = EventConsumer(settings.kafka, registry, f"collect-{uuid.uuid4().hex}",
                                      namespace=namespace)
        self.consumer.subscribe(event_names)
        self.records = []

    def drain(self) -> list:
        while (r := self.consumer.poll(0.2)) is not None:
            self.records.append(r)
        return self.records

    def events(self, kind: type | None = None) -> list:
        self.drain()
        return [r.event for r in self.records if kind is None or isinstance(r.event, kind)]

    def unique(self, kind: type) -> dict:
        return {e.event_id: e for e in self.events(kind)}

    def close(self) -> None:
        self.consumer.close()
