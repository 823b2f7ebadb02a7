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
    app.command("openclaw")(openclaw)
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
                  kafka: bool = typer.Option(False, help="also drain the spool to Kafka (a fresh namespace)"),
                  engine: str = typer.Option("process", help="process: the engine in its own process (`nextstate "
                                                             "serve`, reached with engine=remote); inline: inside "
                                                             "the gateway's process")) -> None:
    """Added latency of the gateway over calling the engine directly, p50/p99 per concurrency."""
    from infra.settings import load_settings
    from producers.bench_gateway import run_gateway_bench

    try:
        levels = [int(c) for c in clients.split(",") if c.strip()]
        if engine not in ("process", "inline"):
            raise typer.BadParameter(f"--engine {engine!r}: process or inline")
        run_gateway_bench(load_settings(), model, levels, max_tokens, rounds, kafka, console, engine)
    except NextstateError as exc:
        fail(exc)


def openclaw(url: Optional[str] = typer.Option(None, help="the gateway; default http://<gateway.host>:<gateway.port>"),
             key: Optional[str] = typer.Option(None, envvar="NEXTSTATE_OPENCLAW_KEY",
                                               help="the key OpenClaw will send; default: the local development key"),
             write: Optional[str] = typer.Option(None, help="merge the config into this openclaw.json (plain JSON) "
                                                            "instead of printing it"),
             provider: str = typer.Option("nextstate", help="the provider's name in OpenClaw"),
             model_id: str = typer.Option("policy", help="the model id OpenClaw will use"),
             max_tokens: int = typer.Option(1024, min=1, help="the most tokens OpenClaw asks for in one reply "
                                                              "(at most a quarter of the context)"),
             check: bool = typer.Option(True, help="send one request (a side turn, never trained on) to check the pairing")) -> None:
    """OpenClaw's provider config for the served model: key, context window, session headers on, and
    the small profile when the context is too small for OpenClaw's stock prompt."""
    import asyncio
    import json
    from pathlib import Path

    import httpx

    from infra.settings import Profile, load_settings
    from producers.gateway.auth import dev_key
    from producers.openclaw import PairingError, check_pairing, openclaw_config, served

    settings = load_settings()
    g = settings.gateway
    base = url or f"http://{g.host}:{g.port}"
    if key is None:
        if settings.profile is not Profile.LOCAL or g.api_keys:
            fail("give the key OpenClaw will send (--key or NEXTSTATE_OPENCLAW_KEY): the gateway stores only hashes")
        key = dev_key(g.dev_key_file)

    async def ask():
        async with httpx.AsyncClient(base_url=base, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
            what = await served(c)
            return what, (await check_pairing(c, model_id) if check else None)

    try:
        what, pairing = asyncio.run(ask())
    except (httpx.HTTPError, PairingError) as exc:
        fail(f"the gateway at {base} did not answer as expected: {exc}")
    config, dropped = openclaw_config(base, key, what, provider, model_id, max_tokens)
    if write:
        path = Path(write).expanduser()
        try:
            current = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            fail(f"{path} is not plain JSON (OpenClaw also reads JSON5): merge the printed config by hand")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_merge(current, config), indent=2) + "\n")
        console.print(f"wrote the {provider!r} provider into {path}", markup=False)
    else:
        console.print_json(json.dumps(config))
    console.print(f"served: {what.model}, context {what.context} tokens, policy v{what.policy_version}", markup=False)
    if dropped:
        console.print(f"the context is under OpenClaw's stock prompt, so the config carries the small profile; "
                      f"it drops: {'; '.join(dropped)}", markup=False)
    if pairing is not None:
        console.print(f"pairing checked: a chat request was answered ({pairing['reply']!r}), session "
                      f"{pairing['session']}; recorded as a side turn, never trained on", markup=False)


def _merge(into: dict, new: dict) -> dict:
    out = dict(into)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
