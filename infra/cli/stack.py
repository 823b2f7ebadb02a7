"""`nextstate stack up | down | status | logs`: the command-line face of infra/stack.

Only parses, builds settings, calls infra.stack and prints; a StackError becomes a red message
and exit code 1. Mounted by infra/cli/__init__.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import typer
from rich.table import Table

from infra.cli.common import console, err_console, fail
from infra.errors import NextstateError
from infra.settings import load_settings
from infra.stack import ServiceState, ServiceStatus, service_names

stack_app = typer.Typer(no_args_is_help=True, add_completion=False)

_STYLE = {ServiceState.HEALTHY: "green", ServiceState.UNHEALTHY: "yellow", ServiceState.STOPPED: "red"}


def print_status(statuses: Sequence[ServiceStatus]) -> None:
    notes = any(s.detail for s in statuses)
    table = Table(title="nextstate local stack")
    for column in ("service", "state", "pid", "address", "version", *(["note"] if notes else [])):
        table.add_column(column, overflow="fold")
    for s in statuses:
        style = _STYLE[s.state]
        cells = [s.name, f"[{style}]{s.state}[/{style}]", str(s.pid or "-"), s.address, s.version]
        table.add_row(*cells, *([s.detail] if notes else []))
    console.print(table)




@stack_app.command()
def up(provision: bool = typer.Option(True, help="create topics, schemas and the bucket once healthy")) -> None:
    """Install (once per machine) and start Kafka, the schema registry and MinIO; wait until
    healthy; then provision the default namespace."""
    from infra.provision import provision as run_provision
    from infra.stack import up as stack_up
    from processors.topology import control_topics

    try:
        s = load_settings()
        statuses = stack_up(s.stack, s.storage, progress=lambda line: err_console.print(f"[dim]{line}[/dim]"))
        provisioned = (run_provision(s.kafka, s.registry, s.storage, control=control_topics(s.kafka.namespace))
                       if provision else None)
    except NextstateError as exc:
        fail(exc)
    print_status(statuses)
    if provisioned:
        created = sum(state == "created" for state in provisioned["topics"].values())
        err_console.print(
            f"provisioned {len(provisioned['topics'])} topics ({created} new) under "
            f"{s.kafka.namespace!r}, {len(provisioned['schemas'])} schemas, "
            f"bucket {provisioned['bucket']['name']!r}"
        )


@stack_app.command()
def down() -> None:
    """Stop the services this stack started (never anything else)."""
    from infra.stack import down as stack_down

    try:
        s = load_settings()
        statuses = stack_down(s.stack, s.storage)
    except NextstateError as exc:
        fail(exc)
    print_status(statuses)


@stack_app.command()
def status() -> None:
    """Show each service's state, pid, address and version; exit 1 unless all are healthy."""
    from infra.stack import status as stack_status

    try:
        s = load_settings()
        statuses = stack_status(s.stack, s.storage)
    except NextstateError as exc:
        fail(exc)
    print_status(statuses)
    if any(st.state is not ServiceState.HEALTHY for st in statuses):
        raise typer.Exit(1)


@stack_app.command()
def logs(
    service: str = typer.Argument(..., help=f"one of: {', '.join(service_names())}"),
    lines: int = typer.Option(50, "-n", "--lines", min=0, help="how many lines from the end"),
) -> None:
    """Print the end of one service's log."""
    from infra.stack import logs as stack_logs

    try:
        s = load_settings()
        found = stack_logs(s.stack, service, lines)
    except NextstateError as exc:
        fail(exc)
    for line in found:
        typer.echo(line)
