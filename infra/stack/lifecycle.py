"""`up`, `down`, `status` and `logs` of the local stack, over the services in services.py.

`up` is idempotent: a service this stack started and that still runs (pid file, same process,
answers its health check) is left alone. A port held by any other program is reported, never
fought over. `down` stops only processes whose pid files this stack wrote.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from infra.errors import StackError
from infra.settings import StackSettings, StorageSettings
from infra.stack import procs
from infra.stack.install import Progress
from infra.stack.services import Port, Service, all_services

LOG_LINES_ON_ERROR = 30


class ServiceState(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: ServiceState
    pid: int | None
    address: str
    version: str
    detail: str = ""


def _ignore(_: str) -> None:
    pass


@contextmanager
def _stack_lock(state_dir: Path) -> Iterator[None]:
    # Two `up`s at once (two shells, parallel tests) must not both start a Kafka.
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "stack.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ours(service: Service) -> procs.PidRecord | None:
    record = procs.read_pid(service.pid_path)
    return record if record is not None and procs.is_alive(record) else None


def _held(service: Service) -> list[tuple[Port, str | None]]:
    """Ports of the service that some other program holds, with who holds them if visible."""
    return [
        (port, procs.port_holder(port.port))
        for port in service.ports
        if not procs.port_free(service.stack.host, port.port)
    ]


def _conflicts(service: Service) -> list[str]:
    return [
        f"{service.name} {port.role} port {service.stack.host}:{port.port} is in use by another program"
        + (f" ({holder})" if holder else "")
        for port, holder in _held(service)
    ]


def _conflict_error(stack: StackSettings, conflicts: list[str]) -> StackError:
    return StackError(
        "cannot start the local stack, ports are held by programs it did not start "
        f"(state dir {stack.state_dir}):\n  "
        + "\n  ".join(conflicts)
        + "\nStop them, or move the stack to other ports (NEXTSTATE_STACK__KAFKA_PORT etc.). If one is "
        "a nextstate stack with another state dir, `nextstate stack down` with that state dir stops it."
    )


def _failure(service: Service, what: str) -> StackError:
    lines = procs.tail(service.log_path, LOG_LINES_ON_ERROR)
    return StackError(
        f"{service.name} {what}. Last {len(lines)} lines of {service.log_path}:\n" + "\n".join(lines)
    )


def _status(service: Service, record: procs.PidRecord | None, health_timeout_s: float = 3.0) -> ServiceStatus:
    if record is None:
        held = "; ".join(
            f"port {port.port} held by another program" + (f" ({who})" if who else "") for port, who in _held(service)
        )
        return ServiceStatus(service.name, ServiceState.STOPPED, None, service.address, service.version, held)
    state = ServiceState.HEALTHY if service.healthy(health_timeout_s) else ServiceState.UNHEALTHY
    return ServiceStatus(service.name, state, record.pid, service.address, record.version)


def up(stack: StackSettings, storage: StorageSettings, *, progress: Progress = _ignore) -> list[ServiceStatus]:
    """Install what is missing, start what is not running, and wait until all three are healthy."""
    services = all_services(stack, storage)
    with _stack_lock(stack.state_dir):
        running = {s.name: r for s in services if (r := _ours(s)) is not None}
        to_start = [s for s in services if s.name not in running]
        conflicts = [c for s in to_start for c in _conflicts(s)]
        if conflicts:
            raise _conflict_error(stack, conflicts)

        # The slow part on a new machine (Maven downloads, the MinIO build) runs side by side.
        with ThreadPoolExecutor(max_workers=3) as pool:
            for future in [pool.submit(s.install, progress) for s in to_start]:
                future.result()

        # Everything that can fail without starting a process (a JDK too old, bad credentials,
        # formatting Kafka's storage) happens before the first service is started.
        launches = []
        for service in to_start:
            conflicts = _conflicts(service)  # the installs may have taken minutes
            if conflicts:
                raise _conflict_error(stack, conflicts)
            launches.append((service, service.prepare(), service.env()))

        records = dict(running)
        for service, argv, env in launches:
            service.pid_path.unlink(missing_ok=True)
            progress(f"starting {service.name} {service.version} on {service.address}")
            pid = procs.spawn(argv, log_path=service.log_path, cwd=service.home, env=env)
            records[service.name] = procs.write_pid(service.pid_path, pid, service.version)

        _wait_healthy(services, records, stack.start_timeout_s, progress)
        return [_status(s, records[s.name]) for s in services]


def _wait_healthy(
    services: list[Service], records: dict[str, procs.PidRecord], timeout_s: float, progress: Progress
) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = list(services)
    while waiting:
        for service in list(waiting):
            record = records[service.name]
            if not procs.is_alive(record):
                service.pid_path.unlink(missing_ok=True)
                raise _failure(service, f"(pid {record.pid}) exited before it became healthy")
            if service.healthy(timeout_s=2.0):
                progress(f"{service.name} is healthy")
                waiting.remove(service)
        if waiting and time.monotonic() > deadline:
            service = waiting[0]
            raise _failure(
                service, f"(pid {records[service.name].pid}) did not become healthy at {service.address} within {timeout_s:.0f}s"
            )
        if waiting:
            time.sleep(0.25)


def down(stack: StackSettings, storage: StorageSettings) -> list[ServiceStatus]:
    """Stop every service this stack started (SIGTERM, then SIGKILL after a grace period)."""
    services = all_services(stack, storage)
    with _stack_lock(stack.state_dir):
        records = {s.name: r for s in services if (r := _ours(s)) is not None}
        with ThreadPoolExecutor(max_workers=3) as pool:
            for future in [pool.submit(procs.stop, r) for r in records.values()]:
                future.result()
        for service in services:
            record = procs.read_pid(service.pid_path)
            if record is not None and not procs.is_alive(record):
                service.pid_path.unlink(missing_ok=True)
        return [_status(s, _ours(s)) for s in services]


def status(stack: StackSettings, storage: StorageSettings) -> list[ServiceStatus]:
    """Per service: healthy, unhealthy (running but not answering) or stopped."""
    return [_status(s, _ours(s)) for s in all_services(stack, storage)]


def service_names() -> list[str]:
    return [s.name for s in all_services(StackSettings(), StorageSettings())]


def logs(stack: StackSettings, service: str, lines: int = 50) -> list[str]:
    """The last `lines` lines of one service's log."""
    known = {s.name: s for s in all_services(stack, StorageSettings())}
    if service not in known:
        raise StackError(f"no service {service!r} in the local stack; known: {', '.join(known)}")
    return procs.tail(known[service].log_path, lines)
