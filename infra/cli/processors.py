"""`nextstate process`, `nextstate replay` and `nextstate bench pipeline`: thin mains.

Each command parses, builds settings and calls the loop in processors/. faust, torch and
the engines are imported inside the commands, so `nextstate --help` stays fast.
"""

from __future__ import annotations

from typing import Optional

import typer

from infra.cli.common import console, fail
from infra.errors import NextstateError
from infra.settings import load_settings


def _stage_names() -> list[str]:
    from processors.topology import BY_NAME

    return list(BY_NAME)


def process(stage: str = typer.Argument(..., help="a stage of `nextstate topology`, or all"),
            namespace: Optional[str] = typer.Option(None, help="topic prefix; default from settings"),
            loglevel: str = typer.Option("warning", help="faust/worker log level")) -> None:
    """Run one stream processor stage as a faust worker, or every stage (one process each)."""
    settings = load_settings()
    ns = settings.kafka.namespace if namespace is None else namespace
    if stage == "all":
        raise typer.Exit(_run_all(settings, ns, loglevel))
    from processors.topology import stage as stage_spec

    try:
        spec = stage_spec(stage)
    except ValueError as exc:
        fail(ValueError(f"{exc} or all"))
    from processors.app import run_worker
    from processors.teacher import build_teacher

    try:
        teacher = build_teacher(settings) if spec.teacher else None
        run_worker(settings, ns, stage, teacher, loglevel)
    except NextstateError as exc:
        fail(exc)


def _run_all(settings, namespace: str, loglevel: str) -> int:
    """One worker process per stage, failing fast: when one exits, or on SIGINT/SIGTERM, all
    stop. They share this process's output and group (a kill of the group reaches them)."""
    from infra.cli.supervisor import PartFailed, Supervisor, nextstate_argv

    sup = Supervisor(settings.stack.state_dir / "parts" / f"processors-{namespace.rstrip('.') or 'default'}",
                     restart=False, logs=False, own_groups=False)
    try:
        for stage in _stage_names():
            sup.start(stage, nextstate_argv(["process", stage, "--namespace", namespace, "--loglevel", loglevel]))
        sup.run()
        return 0
    except PartFailed as exc:
        console.print(f"processors: stage {exc.name!r} exited; stopping the others", markup=False)
        return 1
    finally:
        sup.stop()


def topology() -> None:
    """The processors' stages: what each reads, writes and keeps (processors.topology)."""
    from rich.table import Table

    from processors.topology import describe

    table = Table(title="processor stages (each its own consumer group)")
    for col in ("stage", "reads", "writes", "notes"):
        table.add_column(col)
    for row in describe():
        table.add_row(*row)
    console.print(table)


def replay(stage: str = typer.Argument(..., help="a stage of `nextstate topology`"),
           namespace: str = typer.Option(..., help="the replay namespace to write into (provisioned)"),
           source: Optional[str] = typer.Option(None, "--source", help="live namespace to read; default from settings"),
           start: Optional[str] = typer.Option(None, "--from", help="offset (int) or time (ISO 8601); default: the beginning"),
           end: Optional[str] = typer.Option(None, "--to", help="offset (int) or time (ISO 8601); default: the current end"),
           judge: Optional[str] = typer.Option(None, help="override the judge (e.g. llm) for this replay"),
           copy_inputs: bool = typer.Option(False, help="also copy the slice into the target's input topics")) -> None:
    """Re-run a stage over the live namespace's history into a separate namespace."""
    from processors.replay import run_replay

    settings = load_settings()
    if judge:
        settings = settings.model_copy(update={"processors": settings.processors.model_copy(
            update={"judge": judge})})
    try:
        report = run_replay(settings, stage, settings.kafka.namespace if source is None else source,
                            namespace, start, end, copy_inputs=copy_inputs, console=console)
    except (NextstateError, ValueError) as exc:
        fail(exc)
    console.print(report.summary())
    if stage == "judge":
        print_agreement(settings, settings.kafka.namespace if source is None else source, namespace)


def print_agreement(settings, left_ns: str, right_ns: str) -> None:
    """The table of agreement between two namespaces' reward streams."""
    from rich.table import Table

    from infra.eventlog import read_log
    from processors.compare import SCORES, agreement
    from schemas.events import RewardJudged

    def judged(ns: str) -> list[RewardJudged]:
        s = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"namespace": ns})})
        return [i.event for i in read_log(s, timeout=10.0) if isinstance(i.event, RewardJudged)]

    result = agreement(judged(left_ns), judged(right_ns))
    table = Table(title=f"reward agreement over {result.pairs} transitions")
    table.add_column(f"rows: {left_ns} / columns: {right_ns}")
    for b in SCORES:
        table.add_column(f"{b:+d}", justify="right")
    for a in SCORES:
        table.add_row(f"{a:+d}", *(str(result.table.get((a, b), 0)) for b in SCORES))
    console.print(table)
    console.print(f"agree {result.agree:.1%} · Cohen's kappa {result.kappa:.2f} · "
                  f"judged only in {left_ns}: {result.only_left} · only in {right_ns}: {result.only_right}")


def compare(left: str = typer.Argument(..., help="namespace of one reward stream"),
            right: str = typer.Argument(..., help="namespace of the other")) -> None:
    """Agreement between the reward streams of two namespaces (e.g. live vs a judge replay)."""
    print_agreement(load_settings(), left, right)


def bench_pipeline(turns: int = typer.Option(4000, min=20, help="sessions × turns to push through (enough that the last scan's wait is a small part)"),
                   response_tokens: int = typer.Option(64),
                   llm_calls: int = typer.Option(16, help="judge calls per concurrency level (0: skip)"),
                   model: Optional[str] = typer.Option(None, help="model dir for the llm-judge bench; default: a tiny random model")) -> None:
    """Turns → samples per second through every stage (feedback judge) vs raw Kafka; llm judge at 1 vs 8."""
    from processors.bench_pipeline import run_pipeline_bench

    try:
        run_pipeline_bench(load_settings(), turns, response_tokens, llm_calls, model, console)
    except NextstateError as exc:
        fail(exc)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("process")(process)
    app.command("topology")(topology)
    app.command("replay")(replay)
    app.command("compare")(compare)
    bench_app.command("pipeline")(bench_pipeline)
