"""`python -m infra.cli`: what the `nextstate` command runs (parts are spawned this way)."""

from infra.cli import app

app()
