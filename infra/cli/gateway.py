"""`nextstate gateway` (serve the recording gateway), `nextstate gateway hash-key`, and
`nextstate bench gateway`. Thin: parse, build settings, call into `producers`.

Heavy imports (torch, transformers, uvicorn) happen inside the commands.
"""

from __future__ import annotations

from typing import Optional

import typer

from infra.cli.common import console, fail
from infra.errors import NextstateError

gateway_app = typer.Typer(help="The OpenAI-compatible recording gateway.")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `gateway` to the top-level app and `gateway` to `bench`."""
    app.add_typer(gateway_app, name="gateway")
    bench_app.command("gateway")(bench_gateway)




@gateway_app.callback(invoke_without_command=True)
def serve(ctx: typer.Context,
          host: Optional[str] = typer.Option(None, help="default: settings gateway.host (127.0.0.1)"),
          port: Optional[int] = typer.Option(None, help="default: settings gateway.port (30000)"),
          model: Optional[str] = typer.Option(None, help="model spec for the engine; default: settings serving.model"),
          namespace: Optional[str] = typer.Option(None, help="topic prefix; default from settings"),
          reload: bool = typer.Option(True, help="follow checkpoints and hot-swap the engine's weights"),
          ops: bool = typer.Option(True, help="serve the ops view under /ops (same API keys)")) -> None:
    """Serve the gateway in front of the configured engine, recording every turn to Kafka."""
    if ctx.invoked_subcommand is not None:
        return
    import asyncio
    import logging

    from infra.settings import load_settings
    from producers.gateway.server import build_gateway, load_tokenizer, run_gateway
    from serving import create_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        serving = settings.serving.model_copy(update={"model": model}) if model else settings.serving
        engine = create_engine(serving)
        gw = build_gateway(settings, engine, load_tokenizer(engine, serving), namespace=namespace)
    except NextstateError as exc:
        fail(exc)
    g = settings.gateway
    if not g.api_keys:
        console.print(f"local profile, no gateway.api_keys: tenant [bold]{g.tenant}[/bold] uses the "
                      f"development key in {g.dev_key_file} (mode 0600)")
    info = engine.info()
    console.print(f"gateway on http://{host or g.host}:{port or g.port}/v1 | model {gw.model_name} | "
                  f"engine {info.name} v{info.policy_version} | context {info.max_context} | "
                  f"spool {g.spool_dir} ({gw.spool.depth} pending)")
    try:
        from infra.cli.ops import mount

        run_gateway(gw, host or g.host, port or g.port, settings=settings, namespace=namespace,
                    reload=reload, mount=mount(settings, namespace) if ops else None)
    finally:
        asyncio.run(engine.close())


@gateway_app.command("hash-key")
def hash_key_cmd(key: str = typer.Option(..., prompt=True, hide_input=True,
                                         help="the API key to store hashed")) -> None:
    """Print the 'sha256:<hex>' form of a key, to put in NEXTSTATE_GATEWAY__API_KEYS."""
    from producers.gateway.auth import hash_key

    console.print(hash_key(key))


def bench_gateway(model: Optional[str] = typer.Option(None, help="model spec; default: a tiny random model"),
                  clients: str = typer.Option("1,16,64", help="concurrency levels, comma-separated"),
                  max_tokens: int = typer.Option(16, help="tokens generated per request"),
                  rounds: int = typer.Option(8, help="requests per client at each level (at least 48 in all)"),
                  kafka: bool = typer.Option(False, help="also drain the spool to Kafka (a fresh namespace)")) -> None:
    """Added latency of the gateway over calling the engine directly, p50/p99 per concurrency."""
    from infra.settings import load_settings
    from producers.bench_gateway import run_gateway_bench

    try:
        levels = [int(c) for c in clients.split(",") if c.strip()]
        run_gateway_bench(load_settings(), model, levels, max_tokens, rounds, kafka, console)
    except NextstateError as exc:
        fail(exc)
