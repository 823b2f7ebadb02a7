"""The one supervisor of processes, and `nextstate up` / `down` built on it.

`Supervisor` runs named parts, each its own process group with its own log: restarting them
(`nextstate up`) or failing fast (the demo, `nextstate process all`).

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
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.errors import NextstateError
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


class PartFailed(NextstateError):
    """A part of a fail-fast group exited; names it and quotes the end of its log."""

    def __init__(self, name: str, log: Path | None, tail: list[str]) -> None:
        where = f"; last log lines of {log}:\n" + "\n".join(tail) if log else ""
        super().__init__(f"part {name!r} exited{where}")
        self.name, self.log = name, log


def parts_dir(settings: Settings) -> Path:
    return settings.stack.state_dir / "parts"


def nextstate_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "infra.cli", *args]


@dataclass
class PartState:
    name: str
    pid: int | None = None
    starts: int = 0
    quick_failures: int = 0
    state: str = "starting"      # running | backoff | failed | stopped
    last_exit: str = ""


@dataclass
class _Part:
    argv: list[str]
    env: dict[str, str]
    state: PartState
    record: procs.PidRecord | None = None
    started_at: float = 0.0
    next_try: float = 0.0
    backoff: float = BACKOFF_START_S


class Supervisor:
    """Named parts, each its own process group with its own log under `directory` (or the
    supervisor's own output when `logs` is False; in the supervisor's own group when
    `own_groups` is False, so that killing it kills them), watched by `poll()`.

    With `restart`, a part that exits is started again after an exponential backoff, and one
    that keeps failing soon after start is given up on (state `failed`, the reason in its log):
    what `nextstate up` runs. Without it the group fails fast: `poll()` raises PartFailed
    naming the part and the end of its log, which is what the demo and `process all` want.
    The states are written to `directory/states.json` for `nextstate ps`.
    """

    def __init__(self, directory: Path, env: Mapping[str, str] | None = None, *, restart: bool = True,
                 logs: bool = True, own_groups: bool = True, backoff_start_s: float = BACKOFF_START_S,
                 give_up_after: int = GIVE_UP_AFTER) -> None:
        self.directory, self.env, self.restart, self.logs = directory, dict(env or {}), restart, logs
        self.own_groups = own_groups   # False: parts stay in our group and die with it
        self.backoff_start_s, self.give_up_after = backoff_start_s, give_up_after
        self.parts: dict[str, _Part] = {}
        self._stopped: dict[str, PartState] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def log_path(self, name: str) -> Path | None:
        return self.directory / f"{name}.log" if self.logs else None

    def start(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        part = self.parts.get(name) or _Part(argv, {**self.env, **(env or {})}, PartState(name),
                                             backoff=self.backoff_start_s)
        self.parts[name] = part
        self._spawn(name, part)

    def _spawn(self, name: str, part: _Part) -> None:
        pid = procs.spawn(part.argv, log_path=self.log_path(name), cwd=Path.cwd(), env=part.env,
                          own_session=self.own_groups)
        part.record = procs.write_pid(self.directory / f"{name}.pid", pid, "part")
        part.started_at = time.monotonic()
        st = part.state
        st.pid, st.starts, st.state = pid, st.starts + 1, "running"

    def alive(self, name: str) -> bool:
        part = self.parts.get(name)
        return part is not None and part.record is not None and procs.is_alive(part.record)

    def poll(self) -> None:
        """One look at every part: restart what exited (or raise PartFailed); write the states."""
        now = time.monotonic()
        try:
            for name, part in self.parts.items():
                st = part.state
                if part.record is not None and procs.is_alive(part.record):
                    if now - part.started_at > STABLE_AFTER_S:
                        part.backoff, st.quick_failures = self.backoff_start_s, 0
                    continue
                if part.record is not None:   # it exited
                    part.record = None
                    st.pid, st.last_exit = None, f"exited after {now - part.started_at:.0f}s"
                    if not self.restart:
                        st.state = "failed"
                        log = self.log_path(name)
                        raise PartFailed(name, log, procs.tail(log, 25) if log else [])
                    st.quick_failures += now - part.started_at < STABLE_AFTER_S
                    if st.quick_failures >= self.give_up_after:
                        st.state = "failed"
                        self._note(name, f"{name} failed {st.quick_failures} times in a row soon after "
                                         "start; not restarting it (see above)")
                        continue
                    st.state = "backoff"
                    part.next_try = now + part.backoff
                    part.backoff = min(BACKOFF_MAX_S, part.backoff * 2)
                if self.restart and st.state == "backoff" and now >= part.next_try:
                    self._spawn(name, part)
        finally:
            self._write_states()

    def run(self, interval_s: float = 0.5) -> None:
        """poll() until SIGTERM or SIGINT arrives (a fail-fast group raises PartFailed instead);
        the parts are left to `stop()`."""
        signalled = False

        def on_signal(*_: object) -> None:
            nonlocal signalled
            signalled = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not signalled:
            self.poll()
            time.sleep(interval_s)

    def stop(self, names: list[str] | None = None, grace_s: float = 30.0) -> None:
        """SIGTERM the parts (all at once), SIGKILL what still runs after `grace_s`; forget them."""
        stopping = [(n, self.parts.pop(n)) for n in (list(self.parts) if names is None else names) if n in self.parts]
        for _, part in stopping:
            if part.record is not None:
                procs.terminate(part.record)
        deadline = time.monotonic() + grace_s
        for name, part in stopping:
            if part.record is not None:
                procs.stop(part.record, grace_s=max(0.0, deadline - time.monotonic()))
            part.state.state, part.state.pid = "stopped", None
            self._stopped[name] = part.state
        self._write_states()

    def _note(self, name: str, line: str) -> None:
        log = self.log_path(name)
        if log is not None:
            with open(log, "a") as handle:
                handle.write(f"\n=== supervisor: {line} ===\n")

    def _write_states(self) -> None:
        states = {**self._stopped, **{n: p.state for n, p in self.parts.items()}}
        tmp = self.directory / "states.json.tmp"
        tmp.write_text(json.dumps({n: asdict(s) for n, s in states.items()}, indent=1))
        tmp.replace(self.directory / "states.json")


def read_states(settings: Settings) -> dict[str, dict]:
    try:
        return json.loads((parts_dir(settings) / "states.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def default_parts() -> dict[str, list[str]]:
    return {name: nextstate_argv(args) for name, args in PARTS.items()}


def supervise(settings: Settings, parts: dict[str, list[str]] | None = None, *,
              backoff_start_s: float = BACKOFF_START_S, give_up_after: int = GIVE_UP_AFTER) -> None:
    """Run until SIGTERM/SIGINT: keep every part (name -> argv) running, then stop them all."""
    sup = Supervisor(parts_dir(settings), backoff_start_s=backoff_start_s, give_up_after=give_up_after)
    for name, argv in (parts or default_parts()).items():
        sup.start(name, argv)
    try:
        sup.run()
    finally:
        sup.stop()


def start_supervisor(settings: Settings) -> int:
    """Start the detached supervisor unless ours already runs; its pid."""
    directory = parts_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    pid_file = directory / "supervisor.pid"
    existing = procs.read_pid(pid_file)
    if existing is not None and procs.is_alive(existing):
        return existing.pid
    pid = procs.spawn(nextstate_argv(["supervise"]), log_path=directory / "supervisor.log",
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
    raise ImportError("infra.cli.supervisor needs a POSIX system")
