"""A sessionize worker (`python -m tests.processors.disturbed_worker NAMESPACE worker`) whose
input order is disturbed once: after it has handled 8 records, the offset it expects next on
every turns partition is moved 3 back, as if those records had never been handed on. The
next record then arrives "ahead of its predecessors", which is what faust can do around a
rebalance (processors.order), and the partition must be rewound and read again."""

from __future__ import annotations

import asyncio
import sys

import faust

from infra.settings import load_settings
from processors.app import build_app


def main() -> None:
    wiring = build_app(load_settings(), sys.argv[1], "sessionize")
    app = wiring.app

    @app.task
    async def disturb() -> None:
        while wiring.runner.counts["in"] < 8:
            await asyncio.sleep(0.1)
        moved = {tp: e - 3 for tp, e in app.order.expected.items()
                 if e is not None and e >= 3 and tp.topic.endswith("turns")}
        app.order.expected.update(moved)
        print("DISTURBED", sorted(f"{tp.topic}[{tp.partition}]" for tp in moved), flush=True)
        while True:
            await asyncio.sleep(0.5)
            print("ORDER", dict(app.order.counts), flush=True)

    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
