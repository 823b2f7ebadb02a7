"""`nextstate serve` (the configured engine plus its checkpoint reloader) and
`nextstate bench swap`. Thin: parse, build settings, call into `serving`.

Heavy imports (torch, transformers) happen inside the commands.
"""

from __future__ import annotations

from typing import Optional

import typer

from infra.cli.common import console, fail
from infra.errors import NextstateError


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `serve` to the top-level app and `swap` to `bench`."""
    app.command("serve")(serve)
    bench_app.command("swap")(bench_swap)
    bench_app.command("engine")(bench_engine)




def serve(model: Optional[str] = typer.Option(None, help="model spec; default: settings serving.model"),
          engine: Optional[str] = typer.Option(None, help="engine name; default: settings serving.engine"),
          namespace: Optional[str] = typer.Option(None, help="topic prefix; default from settings"),
          host: Optional[str] = typer.Option(None, help="default: settings serving.host (127.0.0.1)"),
          port: Optional[int] = typer.Option(None, help="default: settings serving.port (30001)"),
          http: bool = typer.Option(True, help="expose the engine over HTTP (serving.server)")) -> None:
    """Run the serving engine, expose it over HTTP, and follow `checkpoints`, hot-swapping
    weights as they land (reach it from another process with engine=remote)."""
    import asyncio
    import logging
    import signal

    from infra import heap
    from infra.settings import load_settings
    from serving import create_engine
    from serving.reloader import build_reloader

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        from serving.server import build_app, serve_http

        settings = load_settings()
        update = {k: v for k, v in (("model", model), ("engine", engine), ("host", host), ("port", port)) if v}
        s = settings.model_copy(update={"serving": settings.serving.model_copy(update=update)})
        eng = create_engine(s.serving)
        try:
            if hasattr(eng, "start"):
                await eng.start()
            info = eng.info()
            where = f"http://{s.serving.host}:{s.serving.port}" if http else "in-process only"
            console.print(f"engine {info.name} | model {info.model} | v{info.policy_version} | context "
                          f"{info.max_context} | {where} | following {s.kafka.topic('checkpoints', namespace)}")
            reloader = build_reloader(eng, s, namespace=namespace)
            heap.freeze()   # start-up is over: later collections skip the model's objects (infra.heap)
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            follower = asyncio.create_task(reloader.run_forever(stop))
            try:
                if http:
                    await serve_http(build_app(eng, s.serving), s.serving.host, s.serving.port, stop)
                else:
                    await follower
            finally:
                stop.set()
                await follower
                reloader.close()
        finally:
            await eng.close()

    try:
        asyncio.run(main())
    except NextstateError as exc:
        fail(exc)


def bench_swap(model: Optional[str] = typer.Option(None, help="model spec; default: a tiny random model"),
               concurrency: int = typer.Option(8, help="concurrent generate loops"),
               idle_s: float = typer.Option(10.0, help="seconds of idle-latency measurement"),
               max_tokens: int = typer.Option(16, help="tokens generated per request")) -> None:
    """Checkpoint event -> first response on the new version (FULL and LoRA), p99 latency
    during a swap vs idle, requests refused (must be 0). Needs the local stack."""
    import asyncio

    from infra.settings import load_settings
    from serving.bench_swap import run_swap_bench

    try:
        results = asyncio.run(run_swap_bench(load_settings(), model, concurrency, idle_s, max_tokens, console))
    except NextstateError as exc:
        fail(exc)
    if results.get("refused_or_failed"):
        raise typer.Exit(1)


def bench_engine(model: Optional[str] = typer.Option(None, help="model spec; default: settings serving.model"),
                 concurrency: str = typer.Option("1,8", help="concurrency levels, comma-separated"),
                 max_tokens: int = typer.Option(64, help="tokens asked per request"),
                 prefix_tokens: int = typer.Option(6000, help="system prompt length for the prefix-cache "
                                                   "measurement (0: skip)")) -> None:
    """Decode tokens/s of the configured engine at each concurrency level (aggregate), the
    memory-bandwidth floor, and first-token time with a long system prompt cold vs shared."""
    import asyncio

    from infra.settings import load_settings
    from serving import create_engine
    from serving.bench_engine import run_engine_bench, run_prefix_bench

    async def main() -> None:
        from transformers import AutoTokenizer

        settings = load_settings()
        levels = [int(c) for c in concurrency.split(",")]
        update = {"max_batch_size": max(levels), **({"model": model} if model else {})}
        engine = create_engine(settings.serving.model_copy(update=update))
        try:
            if hasattr(engine, "start"):
                await engine.start()
            info = engine.info()
            console.print(f"engine {info.name} | model {info.model} | {info.details.get('device', '')}")
            tokenizer = AutoTokenizer.from_pretrained(info.details["tokenizer"])
            await run_engine_bench(engine, tokenizer, levels, max_tokens, console)
            if prefix_tokens > 0:
                await run_prefix_bench(engine, tokenizer, prefix_tokens, console)
        finally:
            await engine.close()

    try:
        asyncio.run(main())
    except NextstateError as exc:
        fail(exc)
