"""A sandbox for the code and shell commands an environment runs for the agent (no Docker).

Each run gets a fresh temporary directory and runs under `unshare` in new user, network, pid
and mount namespaces:

- **no network at all**: the new network namespace has only a loopback that is down, so even
  127.0.0.1 (where Kafka and the gateway listen) is unreachable;
- **its own pids**: the command's tree lives in a pid namespace whose init is killed with the
  `unshare` process (`--kill-child`), so nothing it forked outlives the run;
- **nothing written outside its directory**: the run takes a uid of its own (one per
  concurrent run, never a real user's; hence the sandbox needs root), so files elsewhere are
  read-only to it by plain permissions; the world-writable places (/tmp, /var/tmp, /dev/shm)
  are fresh tmpfs mounts; the directory itself is bound at /mnt and is the working directory.
  The command then runs in one more, unmapped user namespace, where those mounts are locked:
  it cannot unmount the tmpfs to reach the host's /tmp. A mount that fails aborts the run;
- **rlimits** (set by `prlimit`, not in a preexec hook: callers run threads): CPU seconds,
  address space, file size and processes (counted per uid, hence the uid of its own), plus a
  wall-clock timeout that kills the whole tree and a cap on the output kept (past it the run
  is stopped and the output marked cut).

Where namespaces are unavailable, or we are not root (`probe()` says why), a Sandbox refuses
to start unless the caller passes `allow_weaker=True`: then it keeps rlimits, the own uid when
root, the timeout, the output cap and a kill of its process group at the end, but the command
can reach the network and write where its uid may. Knows nothing about environments or Kafka.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from infra.errors import NextstateError

# Inside the namespaces: bind the run's directory at /mnt, fresh tmpfs over the world-writable
# places, then one more user (and mount) namespace in which the command runs unmapped, without
# rights over those mounts: they are locked, so it cannot unmount /tmp to reach the host's.
# Any step that fails aborts the run (exit 125) rather than running the command unisolated.
_SETUP_FAILED = "nextstate-sandbox: setup failed"
_INNER = ('fail() {{ echo "' + _SETUP_FAILED + ': $1" >&2; exit 125; }};'
          ' mount --bind "$PWD" /mnt && cd /mnt || fail "bind mount";'
          ' for d in /tmp /var/tmp /dev/shm; do if [ -d "$d" ]; then'
          ' mount -t tmpfs -o size={tmpfs} none "$d" || fail "tmpfs on $d"; fi; done;'
          ' exec unshare --user --mount -- "$@"')
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
    """None if namespaces work here for the uid a run takes, else why not (cached)."""
    for tool in ("unshare", "prlimit"):
        if shutil.which(tool) is None:
            return f"the `{tool}` program (util-linux) is not installed"
    if os.geteuid() != 0:
        return ("not running as root, so a run cannot take a uid of its own and could write "
                "wherever this user can")
    work = Path(tempfile.mkdtemp(prefix="nextstate-sandbox-probe-"))
    uid = _UID_BASE + 9_999
    try:
        os.chown(work, uid, uid)
        done = subprocess.run([*_UNSHARE, "sh", "-c", _INNER.format(tmpfs=1 << 20), "sandbox", "true"],
                              cwd=work, user=uid, group=uid, extra_groups=[], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unshare could not run: {exc}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if done.returncode != 0:
        return ("user, network, pid and mount namespaces are not available to an unprivileged uid "
                "here: " + done.stderr.decode(errors="replace").strip()[:300])
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
        why = probe()   # the module's, looked up at call time (tests replace it)
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
        uid = _UID_BASE + next(_uids) % 9_999 if os.geteuid() == 0 else None   # the probe has the last one
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
        # rlimits by prlimit (no preexec_fn: this runs in threaded processes), the uid by Popen.
        limits = [f"--cpu={lim.cpu_s}", f"--as={lim.memory_bytes}", f"--fsize={lim.file_bytes}", "--core=0"]
        if uid is not None:   # processes are counted per uid: only a uid of its own makes this a per-run cap
            limits.append(f"--nproc={lim.processes}")
        cmd = ["prlimit", *limits, "--", *cmd]
        who = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}

        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/mnt" if self.isolation == "namespaces" else str(work),
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=work, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True, **who)
        kept = {"out": bytearray(), "err": bytearray()}
        over = asyncio.Event()

        async def read(stream: asyncio.StreamReader, into: bytearray) -> None:
            # Past the cap the rest is read and dropped (a pipe left unread would keep the
            # process transport from ever seeing its end) and the run is stopped.
            while chunk := await stream.read(65536):
                room = lim.output_bytes - len(kept["out"]) - len(kept["err"])
                into += chunk[:max(room, 0)]
                if len(chunk) > room:
                    over.set()

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
        _kill_tree(proc.pid)   # always: in the weaker mode a background child would outlive the run
        await exited
        capped.cancel()
        try:
            await asyncio.wait_for(readers, 5)
        except asyncio.TimeoutError:
            readers.cancel()
        if proc.returncode == 125 and _SETUP_FAILED in kept["err"].decode(errors="replace"):
            raise SandboxError(f"the sandbox could not be set up: {kept['err'].decode(errors='replace')[:300]}")
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
