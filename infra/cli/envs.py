"""`nextstate envs list | run | issue | worker`: general agents' rollouts (producers.envs)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Optional

import typer

from infra.cli.common import console, fail
from infra.errors import NextstateError

envs_app = typer.Typer(no_args_is_help=True, help="General agents: environments, tasks and rollouts.")

_NS = typer.Option(None, "--namespace", help="topic prefix; default from settings")
_ENV = typer.Option("toolcall", "--env", help="the environment (see `nextstate envs list`)")
_TASKS = typer.Option(8, "--tasks", min=1, help="how many tasks to generate")
_SEED = typer.Option(0, "--seed", help="the task generator's seed")
_FILE = typer.Option(None, "--tasks-file", help="JSONL tasks (task_id, env, spec, seed) instead of generated ones")
_N = typer.Option(None, "--group-size", "-n", min=1, max=1024, help="rollouts per task; default envs.group_size")


def _tasks(env: str, tasks: int, seed: int, tasks_file: Optional[Path]):
    from producers.envs.base import generate
    from producers.envs.work import load_tasks

    return load_tasks(tasks_file, env) if tasks_file else generate(env, tasks, seed)


def _prefix(given: Optional[str]) -> str:
    """Group ids name one run of a task: the group stage emits a group once and ignores it after."""
    import secrets
    import time

    return given if given is not None else f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(2)}-"


def _producer(settings, ns: str):
    from infra.kafka import EventProducer
    from schemas.serde import registry_client

    return EventProducer(settings.kafka, registry_client(settings.registry), namespace=ns)


@envs_app.command("list")
def list_envs() -> None:
    """The registered environments, their versions and whether they generate tasks."""
    from infra.settings import load_settings
    from producers.envs.base import ENVIRONMENTS, TASKS, load_modules

    try:
        load_modules(load_settings().envs.modules)
    except NextstateError as exc:
        fail(exc)
    from rich.table import Table

    table = Table("environment", "version", "task generator", "what it is")
    for name, cls in sorted(ENVIRONMENTS.items()):
        doc = ((cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__) or "").strip().splitlines()
        table.add_row(name, str(getattr(cls, "version", "")), "yes" if name in TASKS else "no", doc[0] if doc else "")
    console.print(table)


@envs_app.command("run")
def run(env: str = _ENV, tasks: int = _TASKS, seed: int = _SEED, tasks_file: Optional[Path] = _FILE,
        group_size: Optional[int] = _N, namespace: Optional[str] = _NS,
        group_prefix: Optional[str] = typer.Option(None, help="prefix of the group ids; default: one unique to "
                                                              "this run (a group id names one run of a task)")) -> None:
    """Play every task's group of rollouts in this process, through the running gateway, and
    record each episode; the processors (with the group stage) turn them into samples."""
    from infra.settings import load_settings
    from producers.envs.base import load_modules
    from producers.envs.runner import Runner
    from producers.envs.work import gateway_client, run_local

    try:
        settings = load_settings()
        load_modules(settings.envs.modules)
        ns = settings.kafka.namespace if namespace is None else namespace
        n = group_size or settings.envs.group_size
        todo = _tasks(env, tasks, seed, tasks_file)
        sink = _producer(settings, ns)

        async def main():
            async with gateway_client(settings) as client:
                return await run_local(Runner(client, sink, settings.envs), todo, n, _prefix(group_prefix))

        summaries = asyncio.run(main())
        sink.flush(60)
    except NextstateError as exc:
        fail(exc)
    from rich.table import Table

    table = Table("task", "rollouts", "answered", "correct", "used a tool", "errors", "mean outcome")
    for s in summaries:
        table.add_row(s.task_id, str(s.rollouts), str(s.answered), str(s.correct), str(s.with_tools),
                      str(s.errors), f"{s.mean_outcome:+.2f}")
    console.print(table)
    total = sum(s.rollouts for s in summaries)
    console.print(f"{len(summaries)} groups, {total} rollouts: accuracy {sum(s.correct for s in summaries)}/{total}, "
                  f"tool use {sum(s.with_tools for s in summaries)}/{total}, errors {sum(s.errors for s in summaries)}",
                  markup=False)


@envs_app.command("issue")
def issue(env: str = _ENV, tasks: int = _TASKS, seed: int = _SEED, tasks_file: Optional[Path] = _FILE,
          group_size: Optional[int] = _N, namespace: Optional[str] = _NS,
          group_prefix: Optional[str] = typer.Option(None, help="prefix of the group ids; default: one unique "
                                                                "to this issue (a group id names one run of a task)")) -> None:
    """Publish tasks on the `tasks` topic for `nextstate envs worker`s."""
    from infra.settings import load_settings
    from producers.envs.base import load_modules
    from producers.envs.work import issue as publish

    try:
        settings = load_settings()
        load_modules(settings.envs.modules)
        ns = settings.kafka.namespace if namespace is None else namespace
        events = publish(_producer(settings, ns), _tasks(env, tasks, seed, tasks_file),
                         group_size or settings.envs.group_size, group_prefix=_prefix(group_prefix))
    except NextstateError as exc:
        fail(exc)
    console.print(f"issued {len(events)} tasks of {events[0].group_size if events else 0} rollouts each "
                  f"to {ns}tasks", markup=False)


@envs_app.command("worker")
def worker(namespace: Optional[str] = _NS,
           groups_in_flight: int = typer.Option(1, min=1, help="tasks played at once (each n rollouts)"),
           max_tasks: Optional[int] = typer.Option(None, min=1, help="stop after this many tasks")) -> None:
    """Consume the `tasks` topic as a consumer group: play each task's n rollouts and commit it
    once every EpisodeEnded is delivered (a killed worker's group is rerun as a new attempt)."""
    from infra.kafka import EventConsumer, OnDecodeError
    from infra.settings import load_settings
    from producers.envs.base import load_modules
    from producers.envs.runner import Runner
    from producers.envs.work import gateway_client, work
    from schemas.serde import registry_client

    try:
        settings = load_settings()
        load_modules(settings.envs.modules)
        ns = settings.kafka.namespace if namespace is None else namespace
        e = settings.envs
        sink = _producer(settings, ns)
        # the worker polls while its groups play (producers.envs.work), so the default poll
        # interval holds; the session timeout is how long a killed worker keeps its tasks
        consumer = EventConsumer(settings.kafka, registry_client(settings.registry), f"{ns}envs-worker",
                                 namespace=ns, on_decode_error=OnDecodeError.DEAD_LETTER, dead_letters=sink,
                                 stage="envs-worker", **{"session.timeout.ms": int(e.session_timeout_s * 1000)})
        consumer.subscribe(["TaskIssued"])
    except NextstateError as exc:
        fail(exc)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with gateway_client(settings) as client:
            return await work(Runner(client, sink, e), consumer, sink, stop, groups_in_flight, max_tasks)

    try:
        done = asyncio.run(main())
    except NextstateError as exc:
        fail(exc)
    finally:
        consumer.close()
    console.print(f"worker: {done} tasks run", markup=False)


def bench_envs(model: Optional[str] = typer.Option(None, help="model spec; default: a tiny random model"),
               concurrency: str = typer.Option("1,4,16", help="rollout concurrencies, comma-separated"),
               episodes: int = typer.Option(32, help="episodes per concurrency"),
               sandbox_runs: int = typer.Option(20, help="runs of the sandbox overhead measurement"),
               groups: int = typer.Option(100, help="groups through the group stage"),
               group_size: int = typer.Option(4, help="rollouts per group"),
               steps: int = typer.Option(3, help="steps per rollout")) -> None:
    """Sandbox start overhead, episodes/s at several concurrencies, group-stage steps/s vs raw Kafka."""
    from infra.settings import load_settings
    from producers.envs.bench import run_envs_bench

    try:
        levels = [int(x) for x in concurrency.split(",") if x.strip()]
        run_envs_bench(load_settings(), model, levels, episodes, sandbox_runs, groups, group_size, steps, console)
    except (NextstateError, ValueError) as exc:
        fail(exc)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(envs_app, name="envs")
    bench_app.command("envs")(bench_envs)
