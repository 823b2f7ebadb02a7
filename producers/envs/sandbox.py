"""A sandbox for the code and shell commands an environment runs for the agent (no Docker).

Each run gets a fresh temporary directory and runs under `unshare` in new user, network, pid
and mount namespaces:

- **no network at all**: the new network namespace has only a loopback that is down, so even
  127.0.0.1 (where Kafka and the gateway listen) is unreachable;
- **its own pids**: the command's tree lives in a pid namespace whose init is killed with the
  `unshare` process (`--kill-child`), so nothing it forked outlives the run;
- **nothing written outside its directory**: when we are root the run takes a uid of its own
  (one per concurrent run, never a real user's), so files elsewhere are read-only to it by
  plain permissions, and the world-writable places (/tmp, /var/tmp, /dev/shm) are fresh tmpfs
  mounts of its own; the directory itself is bound at /mnt and is the working directory;
- **rlimits**: CPU seconds, address space, file size and processes (counted per uid, hence
  the uid of its own), plus a wall-clock timeout that kills the whole tree and a cap on the
  output kept (past it the run is stopped and the output marked cut).

Where namespaces are unavailable (`probe()` says why) a Sandbox refuses to start, unless the
caller passes `allow_weaker=True`: then it keeps rlimits, the own uid, the timeout and the
output cap, but the command can reach the network and write where its uid may. Knows nothing
about environments or Kafka.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from infra.errors import NextstateError

_INNER = ('mount --bind "$PWD" /mnt && cd /mnt'
          ' && for d in /tmp /var/tmp /dev/shm; do [ -d "$d" ] && mount -t tmpfs -o size={tmpfs} none "$d"; done;'
          ' exec "$@"')
_UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--mount", "--fork", "--kill-child"]
_UID_BASE = 61_000   # above the usual system and user ranges; one uid per run in flight
_uids = itertools.count()


class SandboxError(NextstateError):
    """The sandbox cannot give the isolation asked for."""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 20.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    processes: int = 64
    output_bytes: int = 64 << 10
    tmpfs_bytes: int = 64 << 20


@dataclass(frozen=True)
class Ran:
    """How a sandboxed command ended."""

    exit_code: int | None          # None: killed by us (timeout or output cap)
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool = False
    truncated: bool = False        # the output passed the cap; the run was stopped there
    isolation: str = "namespaces"

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.truncated

    def describe(self) -> str:
        if self.timed_out:
            return f"killed after {self.wall_s:.1f}s (wall-clock limit)"
        if self.truncated:
            return "stopped: output over the cap"
        if self.exit_code is not None and self.exit_code < 0:
            return f"killed by signal {-self.exit_code} ({signal.Signals(-self.exit_code).name})"
        return f"exit code {self.exit_code}"


@lru_cache(maxsize=1)
def probe() -> str | None:
    """None if namespaces work here, else why not (cached for the process)."""
    if shutil.which("unshare") is None:
        return "the `unshare` program (util-linux) is not installed"
    try:
        done = subprocess.run([*_UNSHARE, "sh", "-c", "mount -t tmpfs none /tmp && true"],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare could not run: {exc}"
    if done.returncode != 0:
        return ("user, network, pid and mount namespaces are not available here: "
                + done.stderr.decode(errors="replace").strip()[:300])
    return None


def default_python() -> str:
    """An interpreter every uid may run: the system's, else ours."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("python3") or "python3"


@dataclass
class Sandbox:
    limits: Limits = field(default_factory=Limits)
    allow_weaker: bool = False
    python: str = field(default_factory=default_python)

    def __post_init__(self) -> None:
        why = probe()
        if why and not self.allow_weaker:
            raise SandboxError(f"no sandbox: {why}. Install util-linux and allow unprivileged user "
                               "namespaces, or pass allow_weaker / envs.allow_weak_sandbox to run with "
                               "rlimits and a timeout only (the code can then reach the network).")
        self.isolation = "process" if why else "namespaces"

    async def run_python(self, code: str, stdin: bytes = b"") -> Ran:
        """`code` as a file `main.py` in the run's directory, under the sandbox's interpreter."""
        return await self.run([self.python, "-I", "main.py"], files={"main.py": code}, stdin=stdin)

    async def run(self, argv: list[str], *, files: dict[str, str | bytes] | None = None,
                  stdin: bytes = b"") -> Ran:
        work = Path(tempfile.mkdtemp(prefix="nextstate-sandbox-"))
        uid = _UID_BASE + next(_uids) % 10_000 if os.geteuid() == 0 else None
        try:
            for name, content in (files or {}).items():
                path = work / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content.encode() if isinstance(content, str) else content)
            if uid is not None:
                for path in [work, *work.rglob("*")]:
                    os.chown(path, uid, uid)
            cmd = list(argv)
            if self.isolation == "namespaces":
                cmd = [*_UNSHARE, "sh", "-c", _INNER.format(tmpfs=self.limits.tmpfs_bytes), "sandbox", *cmd]
            return await self._execute(cmd, work, uid, stdin)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def _execute(self, cmd: list[str], work: Path, uid: int | None, stdin: bytes) -> Ran:
        lim = self.limits
        started = time.monotonic()

        def limit() -> None:   # in the child, before exec
            resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s))
            resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
            resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if uid is not None:
                resource.setrlimit(resource.RLIMIT_NPROC, (lim.processes, lim.processes))
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)

        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/mnt" if self.isolation == "namespaces" else str(work),
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=work, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, preexec_fn=limit, start_new_session=True)
        kept = {"out": bytearray(), "err": bytearray()}
        over = asyncio.Event()

        async def read(stream: asyncio.StreamReader, into: bytearray) -> None:
            while chunk := await stream.read(65536):
                room = lim.output_bytes - len(kept["out"]) - len(kept["err"])
                into += chunk[:max(room, 0)]
                if len(chunk) > room:
                    over.set()
                    return

        async def feed() -> None:
            try:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

        readers = asyncio.gather(read(proc.stdout, kept["out"]), read(proc.stderr, kept["err"]), feed())
        capped = asyncio.ensure_future(over.wait())
        exited = asyncio.ensure_future(proc.wait())
        done, _ = await asyncio.wait({exited, capped}, timeout=lim.wall_s, return_when=asyncio.FIRST_COMPLETED)
        timed_out, truncated = not done, capped in done and exited not in done
        if timed_out or truncated:
            _kill_tree(proc.pid)
        await exited
        capped.cancel()
        try:
            await asyncio.wait_for(readers, 5)
        except asyncio.TimeoutError:
            readers.cancel()
        return Ran(None if (timed_out or truncated) else proc.returncode,
                   kept["out"].decode(errors="replace"), kept["err"].decode(errors="replace"),
                   time.monotonic() - started, timed_out, truncated or over.is_set(), self.isolation)


def _kill_tree(pid: int) -> None:
    # The run leads its own process group; in namespaces killing `unshare` also kills the pid
    # namespace's init (--kill-child) and with it everything inside.
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
