"""A demo whose part fails says what failed and where the logs are, and still writes what it
measured (table, JSON, plot) instead of ending on a bare traceback."""

from __future__ import annotations

import socket

import pytest
from rich.console import Console

from infra.cli.demo import DemoConfig, run_demo

pytestmark = [pytest.mark.stack]


def test_a_failed_part_is_named_with_its_log_and_the_report_is_still_written(settings, stack, tiny_model_dir,
                                                                            tmp_path):
    with socket.socket() as taken:   # another program holds the demo gateway's port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = DemoConfig(model=str(tiny_model_dir), sessions=2, concurrency=2, methods=("rl",), port=port,
                         out_dir=tmp_path)
        console = Console(record=True, width=200)
        state = run_demo(settings, cfg, console)

    assert state.failure is not None
    [out] = list(tmp_path.iterdir())
    assert "gateway" in state.failure and str(out / "parts") in state.failure
    assert (out / "parts" / "gateway.log").stat().st_size > 0
    text = console.export_text()
    assert "demo failed" in text and "first-response satisfaction on held-out probes" in text
    assert (out / "satisfaction.png").stat().st_size > 0 and (out / "probes.json").exists()
