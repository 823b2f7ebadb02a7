"""Processes the stack started: pid files, detached spawning, stopping, port and log checks.

A pid file records the pid *and* the kernel's start time of that process, so a pid that the
system reused for some other program is never taken for ours and never signalled. Nothing here
finds or stops processes by name. Knows nothing about Kafka, the registry or MinIO.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Popen objects of services this process spawned: kept so that they are not collected (and
# warned about) while the service runs on after we return.
_spawned: list[subprocess.Popen[bytes]] = []

LOG_ROTATE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_ticks: int
    version: str


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a live pid, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def write_pid(path: Path, pid: int, version: str) -> PidRecord:
    stat = _proc_stat(pid)
    record = PidRecord(pid=pid, start_ticks=stat[1] if stat else 0, version=version)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.__dict__))
    tmp.replace(path)
    return record


def read_pid(path: Path) -> PidRecord | None:
    try:
        data = json.loads(path.read_text())
        return PidRecord(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]), version=str(data["version"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def is_alive(record: PidRecord) -> bool:
    """True while the very process we started runs (not a zombie, not a reused pid)."""
    _reap(record.pid)
    stat = _proc_stat(record.pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == record.start_ticks


def _reap(pid: int) -> None:
    # Only a child of this very process can be reaped; for any other pid this is a no-op.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def spawn(argv: Sequence[str], *, log_path: Path | None, cwd: Path, env: Mapping[str, str] | None = None,
          own_session: bool = True) -> int:
    """Start a detached process (own session) whose stdout and stderr append to log_path
    (None: they go where this process's own output goes). With `own_session` False it stays
    in our process group, so a signal to the group (ours stopped or killed) reaches it too."""
    log = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if log_path.exists() and log_path.stat().st_size > LOG_ROTATE_BYTES:
            log_path.replace(log_path.with_suffix(log_path.suffix + ".1"))
        log = open(log_path, "ab")
        log.write(f"\n=== nextstate stack: starting {' '.join(argv[:1])} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
        log.flush()
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            start_new_session=own_session,
            close_fds=True,
        )
    finally:
        if log is not None:
            log.close()
    _spawned.append(proc)
    return proc.pid


def terminate(record: PidRecord) -> None:
    """SIGTERM the process group we started, without waiting (stop() waits)."""
    if is_alive(record):
        _signal_group(record.pid, signal.SIGTERM)


def stop(record: PidRecord, *, grace_s: float = 30.0) -> None:
    """SIGTERM the process group we started, wait up to grace_s, then SIGKILL it."""
    if not is_alive(record):
        return
    _signal_group(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not is_alive(record):
            return
        time.sleep(0.1)
    _signal_group(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while is_alive(record) and time.monotonic() < deadline:
        time.sleep(0.1)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        # We started it with start_new_session, so it leads its own group; if it does not,
        # signal only the process itself rather than someone else's group.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def port_free(host: str, port: int) -> bool:
    """True if nothing listens on (or holds) host:port, as a server about to bind would see it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR as servers use it: TIME_WAIT leftovers of a service we just stopped do
        # not count as taken, a live listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return True
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return False
        raise
    finally:
        sock.close()


def port_holder(port: int) -> str | None:
    """'pid 123 (name)' of the process listening on a TCP port, when /proc lets us see it."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] in ("0A", "07"):
                inodes.add(cols[9])
    inodes.discard("0")
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    name = (proc / "comm").read_text().strip()
                    return f"pid {proc.name} ({name})"
        except OSError:
            continue
    return None


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a log file (empty if it does not exist)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            # Read a generous window from the end rather than the whole (possibly huge) log.
            window = min(size, max(64 * 1024, lines * 512))
            handle.seek(size - window)
            data = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    found = data.splitlines()
    if window < size:
        found = found[1:]  # the window may have started in the middle of a line
    return found[-lines:] if lines > 0 else []
