"""What every command of the `nextstate` command line shares: its consoles and the one error handler.

A command catches the errors it expects (NextstateError and its kin), hands them to `fail`, and
exits 1 with the message printed as it is: never rich markup, since messages quote log lines
and values with square brackets in them.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(exc: BaseException | str) -> NoReturn:
    err_console.print("error:", style="red", end=" ")
    err_console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)
