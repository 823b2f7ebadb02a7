"""`nextstate learn` and `nextstate bench learner`: parse, build settings, call the learner.

Heavy imports (torch, DeepSpeed, transformers) happen inside the commands. SIGTERM and SIGINT
ask the loop to stop after its current step; it then publishes a last checkpoint. Mounted by
infra/cli/__init__.py through `register`.
"""

from __future__ import annotations

import logging
import signal
from typing import Optional

import typer

from infra.cli.common import console, fail
from infra.errors import NextstateError
from infra.settings import load_settings


def learn(
    run: Optional[str] = typer.Option(None, help="run name (own checkpoints, own consumer group); "
                                                 "default: settings learner.run"),
    start: Optional[str] = typer.Option(None, "--from", help="where a NEW run starts in samples: "
                                        "beginning | end | OFFSET | ISO time; needs --run"),
    namespace: Optional[str] = typer.Option(None, help="topic prefix; default from settings"),
    model: Optional[str] = typer.Option(None, help="base model (HF dir, .gguf, or smollm2); "
                                                   "default: settings serving.model"),
    stop_at_end: bool = typer.Option(False, help="stop (after a last checkpoint) once caught up"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps"),
) -> None:
    """Consume samples, train the policy with DeepSpeed, publish checkpoints; resume where the run left off."""
    from learner.loop import Until
    from learner.loop import learn as run_learner

    if start is not None and run is None:
        console.print("error: --from starts a separate run on history; name it with --run NAME "
                      "so the live run is not touched", style="red")
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per registry lookup otherwise
    until = Until(stop_at_end=stop_at_end, max_steps=max_steps)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: until.stop.set())
    try:
        state = run_learner(load_settings(), run=run, namespace=namespace,
                            start=start or "beginning", model=model, until=until)
    except NextstateError as exc:
        fail(exc)
    console.print(f"stopped at step {state.step}, version {state.version}, "
                  f"{state.samples_trained} samples trained")


def bench_learner(
    seconds: float = typer.Option(30.0, help="about how long one pass of each feed takes (sets the sample count)"),
    rounds: int = typer.Option(3, help="rounds of both feeds, alternating which goes first"),
    prompt_tokens: int = typer.Option(64),
    response_tokens: int = typer.Option(64),
    model: Optional[str] = typer.Option(None, help="model for the Kafka-vs-memory loop; default: "
                                                   "the tiny test model"),
    smollm2: bool = typer.Option(True, help="also time SmolLM2-135M steps (LoRA and full)"),
    full_steps: int = typer.Option(2, help="SmolLM2 optimizer steps per mode"),
) -> None:
    """Tokens/s fed from Kafka vs memory, SmolLM2 LoRA/full step times, checkpoint latency."""
    from learner.bench import run_learner_bench

    try:
        run_learner_bench(load_settings(), prompt_tokens, response_tokens, model,
                          smollm2, full_steps, console, seconds, rounds)
    except NextstateError as exc:
        fail(exc)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("learn")(learn)
    bench_app.command("learner")(bench_learner)
