"""The supervisor against real processes: it restarts a part that exits, gives up on one
that keeps failing at start (no crash loop), and stops every part it started on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from infra.stack import procs
from tests.conftest import wait_for


def _states(state_dir):
    try:
        return json.loads((state_dir / "parts" / "states.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def test_restarts_gives_up_and_stops(tmp_path):
    flag = tmp_path / "once"
    parts = {
        "steady": [sys.executable, "-c", "import time; time.sleep(600)"],
        # exits the first time, runs for good the second time
        "flaky": [sys.executable, "-c",
                  f"import os, time, pathlib; p = pathlib.Path({str(flag)!r});\n"
                  "if not p.exists(): p.touch(); raise SystemExit(3)\ntime.sleep(600)"],
        "broken": [sys.executable, "-c", "raise SystemExit('bad config: no model')"],
    }
    script = textwrap.dedent(f"""
        from infra.settings import load_settings
        from infra.cli.supervisor import supervise
        supervise(load_settings(), {parts!r}, backoff_start_s=0.05, give_up_after=3)
    """)
    env = {**os.environ, "NEXTSTATE_STACK__STATE_DIR": str(tmp_path)}
    sup = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        wait_for(lambda: _states(tmp_path).get("broken", {}).get("state") == "failed", 60,
                 what="the broken part to be given up on")
        wait_for(lambda: _states(tmp_path)["flaky"]["state"] == "running"
                 and _states(tmp_path)["flaky"]["starts"] == 2, 60, what="flaky restarted once")
        states = _states(tmp_path)
        assert states["steady"]["starts"] == 1 and states["steady"]["state"] == "running"
        assert states["broken"]["starts"] == 3
        log = (tmp_path / "parts" / "broken.log").read_text()
        assert "bad config: no model" in log and "not restarting" in log
        records = {n: procs.read_pid(tmp_path / "parts" / f"{n}.pid") for n in ("steady", "flaky")}
        assert all(procs.is_alive(r) for r in records.values())
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)
    assert not any(procs.is_alive(r) for r in records.values())
    assert {s["state"] for n, s in _states(tmp_path).items() if n != "broken"} == {"stopped"}
