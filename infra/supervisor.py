"""`nextstate up` / `down`: every part of the loop as a separate supervised process.

`up` starts the local stack (unless told it runs elsewhere), provisions, then starts one
detached supervisor (`nextstate supervise`). The supervisor starts each part (serving with
the gateway, the processors, the learner) as its own process group with its own log, and
restarts a part that exits, with exponential backoff; a part that keeps failing right
after start is given up on, with the reason in its log and in `nextstate ps`, instead of
crash-looping. `down` stops the supervisor, which stops its parts; `--stack` stops the
stack too. Everything is found by pid file, never by process name.

Scaling out is the usual way: run more `nextstate process <stage>` workers against more
partitions, or the learner under the deepspeed launcher; the supervisor runs one of each.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.settings import Settings
from infra.stack import procs

# name -> command line after `nextstate`. One config for all: every part reads the same
# NEXTSTATE_* environment the supervisor was started with.
PARTS: dict[str, list[str]] = {
    "gateway": ["gateway"],           # hosts the serving engine and its reloader in-process
    "processors": ["process", "all"],
    "learner": ["learn"],
}

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 120.0   # a part that ran this long has its backoff reset
GIVE_UP_AFTER = 8        # consecutive quick failures before the supervisor stops trying


def parts_dir(settings: Settings) -> Path:
    return settings.stack.state_dir / "parts"


def _nextstate_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "infra.cli", *args]


@dataclass
class PartState:
    name: str
    pid: int | None = None
    starts: int = 0
    quick_failures: int = 0
    state: str = "starting"      # running | backoff | failed | stopped
    last_exit: str = ""


def _write_states(directory: Path, states: dict[str, PartState]) -> None:
    tmp = directory / "states.json.tmp"
    tmp.write_text(json.dumps({n: asdict(s) for n, s in states.items()}, indent=1))
    tmp.replace(directory / "states.json")


def read_states(settings: Settings) -> dict[str, dict]:
    try:
        return json.loads((parts_dir(settings) / "states.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def default_parts() -> dict[str, list[str]]:
    return {name: _nextstate_argv(args) for name, args in PARTS.items()}


def supervise(settings: Settings, parts: dict[str, list[str]] | None = None, *,
              backoff_start_s: float = BACKOFF_START_S, give_up_after: int = GIVE_UP_AFTER) -> None:
    """Run until SIGTERM/SIGINT: keep every part (name -> argv) running, then stop them all."""
    parts = parts or default_parts()
    directory = parts_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    states = {name: PartState(name) for name in parts}
    records: dict[str, procs.PidRecord] = {}
    started_at: dict[str, float] = {}
    next_try: dict[str, float] = {name: 0.0 for name in parts}
    backoff = {name: backoff_start_s for name in parts}
    while not stopping:
        now = time.monotonic()
        for name, argv in parts.items():
            st = states[name]
            rec = records.get(name)
            if rec is not None and procs.is_alive(rec):
                if now - started_at[name] > STABLE_AFTER_S:
                    backoff[name], st.quick_failures = backoff_start_s, 0
                continue
            if rec is not None:  # it exited
                records.pop(name)
                st.pid, st.last_exit = None, f"exited after {now - started_at[name]:.0f}s"
                st.quick_failures += now - started_at[name] < STABLE_AFTER_S
                if st.quick_failures >= give_up_after:
                    st.state = "failed"
                    with open(directory / f"{name}.log", "a") as log:
                        log.write(f"\n=== supervisor: {name} failed {st.quick_failures} times in a row "
                                  f"soon after start; not restarting it (see above) ===\n")
                    continue
                st.state = "backoff"
                next_try[name] = now + backoff[name]
                backoff[name] = min(BACKOFF_MAX_S, backoff[name] * 2)
            if st.state == "failed" or now < next_try[name]:
                continue
            pid = procs.spawn(argv, log_path=directory / f"{name}.log", cwd=Path.cwd())
            records[name] = procs.write_pid(directory / f"{name}.pid", pid, "part")
            started_at[name] = now
            st.pid, st.starts, st.state = pid, st.starts + 1, "running"
        _write_states(directory, states)
        time.sleep(0.5)
    for name, rec in records.items():
        procs.stop(rec, grace_s=30.0)
        states[name].state, states[name].pid = "stopped", None
    _write_states(directory, states)


def start_supervisor(settings: Settings) -> int:
    """Start the detached supervisor unless ours already runs; its pid."""
    directory = parts_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    pid_file = directory / "supervisor.pid"
    existing = procs.read_pid(pid_file)
    if existing is not None and procs.is_alive(existing):
        return existing.pid
    pid = procs.spawn(_nextstate_argv(["supervise"]), log_path=directory / "supervisor.log",
                      cwd=Path.cwd(), env={"PYTHONUNBUFFERED": "1"})
    procs.write_pid(pid_file, pid, "supervisor")
    return pid


def stop_supervisor(settings: Settings) -> bool:
    """Stop the supervisor (and so every part); True if one was running."""
    record = procs.read_pid(parts_dir(settings) / "supervisor.pid")
    if record is None or not procs.is_alive(record):
        return False
    # The supervisor stops its parts on SIGTERM; allow it their grace periods.
    procs.stop(record, grace_s=90.0)
    return True


def supervisor_running(settings: Settings) -> bool:
    record = procs.read_pid(parts_dir(settings) / "supervisor.pid")
    return record is not None and procs.is_alive(record)


if os.name != "posix":  # pragma: no cover - the stack and the supervisor are POSIX-only
    raise ImportError("infra.supervisor needs a POSIX system")
