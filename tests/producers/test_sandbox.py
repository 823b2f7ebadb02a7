"""The sandbox against real processes: no network (not even loopback, where Kafka listens),
a fork bomb is contained, an infinite loop is killed, nothing outside its directory is
written, huge output is cut, and a missing isolation is refused unless a weaker mode is asked for."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import pytest

from producers.envs.sandbox import Limits, Sandbox, SandboxError, probe

pytestmark = pytest.mark.skipif(probe() is not None, reason=f"namespaces unavailable: {probe()}")


def run(code: str, **limits) -> object:
    return asyncio.run(Sandbox(Limits(**limits)).run_python(code))


def test_a_clean_run_sees_its_files_and_its_stdin():
    async def go():
        sb = Sandbox()
        return await sb.run(["sh", "-c", "cat data.txt; echo; cat; echo; pwd"], files={"data.txt": "given"},
                            stdin=b"from stdin")
    ran = asyncio.run(go())
    assert ran.ok and ran.stdout.split("\n")[:3] == ["given", "from stdin", "/mnt"]
    assert ran.isolation == "namespaces"


def test_no_network_not_even_loopback():
    with socket.socket() as server:   # a listener on this machine's loopback
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        ran = run(f"""
import socket
s = socket.socket(); s.settimeout(2)
print(s.connect_ex(("127.0.0.1", {port})))
try:
    socket.getaddrinfo("pypi.org", 443); print("resolved")
except OSError as e:
    print("no dns")
""")
    code, dns = ran.stdout.splitlines()
    assert int(code) != 0 and dns == "no dns", ran


def test_a_fork_bomb_is_contained_and_leaves_nothing_running():
    marker = f"bomb-{uuid.uuid4().hex[:8]}"
    ran = run(f"""
import os, time
for _ in range(10_000):
    try:
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", "300", "{marker}"])
    except OSError:
        break
print("stopped forking")
time.sleep(30)
""", processes=32, wall_s=4)
    assert ran.timed_out or "stopped forking" in ran.stdout
    assert not any(marker in _cmdline(p) for p in Path("/proc").iterdir() if p.name.isdigit())


def test_an_infinite_loop_is_killed_by_the_cpu_limit_and_a_sleeper_by_the_wall_clock():
    spin = run("while True: pass", cpu_s=1, wall_s=30)
    assert spin.exit_code not in (0, None) and not spin.timed_out and spin.wall_s < 15   # SIGXCPU, not the wall
    sleeper = run("import time; time.sleep(60)", wall_s=1.5)
    assert sleeper.timed_out and sleeper.exit_code is None and sleeper.wall_s < 10
    assert "wall-clock" in sleeper.describe()


def test_nothing_outside_its_directory_is_written(tmp_path):
    outside = Path("/tmp") / f"nextstate-escape-{uuid.uuid4().hex}"
    here = Path.cwd() / f"escape-{uuid.uuid4().hex}"
    ran = run(f"""
import os
for path in ["{outside}", "{here}", "{tmp_path}/x", "/root/escape", "inside.txt"]:
    try:
        open(path, "w").write("x"); print("wrote", path)
    except OSError as e:
        print("refused", path)
""")
    assert not outside.exists() and not here.exists() and not (tmp_path / "x").exists()
    assert not Path("/root/escape").exists()
    assert f"wrote {outside}" in ran.stdout   # /tmp is the run's own tmpfs: writable, and gone after
    assert "wrote inside.txt" in ran.stdout and f"refused {here}" in ran.stdout


def test_huge_output_is_cut_at_the_cap():
    ran = run("import sys\nwhile True: sys.stdout.write('x' * 65536)", output_bytes=100_000, wall_s=20)
    assert ran.truncated and len(ran.stdout) <= 100_000 and not ran.timed_out and ran.wall_s < 10


def test_without_namespaces_it_refuses_unless_a_weaker_mode_is_asked_for(monkeypatch):
    import producers.envs.sandbox as sandbox

    monkeypatch.setattr(sandbox, "probe", lambda: "unshare: operation not permitted")
    with pytest.raises(SandboxError, match="operation not permitted.*allow_weaker"):
        Sandbox()
    weak = Sandbox(Limits(wall_s=5), allow_weaker=True)
    ran = asyncio.run(weak.run_python("print(6 * 7)"))
    assert ran.ok and ran.stdout.strip() == "42" and ran.isolation == "process"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_the_tmpfs_cannot_be_unmounted_to_reach_the_hosts_tmp():
    target = Path("/tmp") / f"nextstate-unmount-{uuid.uuid4().hex}"
    ran = run(f"""
import ctypes, subprocess
libc = ctypes.CDLL(None, use_errno=True)
print("umount2", libc.umount2(b"/tmp", 2))
print("umount", subprocess.run(["umount", "-l", "/tmp"], capture_output=True).returncode)
open("{target}", "w").write("x")
""")
    assert "umount2 -1" in ran.stdout and "umount 0" not in ran.stdout
    assert not target.exists()
