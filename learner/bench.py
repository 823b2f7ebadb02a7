"""`nextstate bench learner`: numbers for the learner, printed.

1. The same training loop fed from Kafka and from memory, same process, same model and
   samples: tokens/s of each and their ratio (what the event log costs the learner). The
   sample count is chosen so that one pass takes about `seconds` (30 by default) from a short
   calibration run; the two feeds alternate A-B, B-A over `rounds` rounds (drift in the
   machine's load hits both alike) and every round's ratio is printed with the median and the
   spread.
2. Time from the end of a step to its CheckpointPublished (save + upload + publish).
3. SmolLM2-135M-Instruct on this machine, LoRA and full fine-tuning: seconds per 4×128 step.

Both run without the loop guard (learner.loop_guard): 1 and 3 measure the feed and the step,
and the guard's greedy answers, which the tiny random model loops on every prompt, would be
most of each step. What the guard costs on real traffic is `bench personal`'s loop_guard_s.

Uses a fresh topic namespace and bucket, removed afterwards. Knows nothing the loop does not.
"""

from __future__ import annotations

import gc
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from infra.settings import LearnerSettings, Settings
from learner.checkpointing import CheckpointStore, RunState
from learner.feeder import StepFeeder
from learner.loop import LearnerLoop, Ledger, Until
from learner.metrics import MetricsSink, read_metrics
from learner.sources import MemorySampleSource, PrefetchingSource
from schemas.events import Method, SampleReady


def _guard_off(settings: Settings):
    """The learner's loop guard with no prompts checked (see the module docstring)."""
    return settings.learner.loop_guard.model_copy(update={"prompts": 0})


def bench_samples(n: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list[SampleReady]:
    import random

    rng = random.Random(seed)
    return [SampleReady(
        tenant="bench", session_id=f"bench-{i % 16}", turn_index=i, method=Method.COMBINED,
        prompt_token_ids=[rng.randrange(vocab) for _ in range(prompt)],
        response_token_ids=[rng.randrange(vocab) for _ in range(response)],
        loss_mask=[1] * response, behaviour_logprobs=[-3.0] * response,
        teacher_logprobs=[-2.5] * response, reward=rng.choice((1.0, -1.0)), policy_version=0,
    ) for i in range(n)]


def timed_loop(trainer, source, ls: LearnerSettings, work: Path, store=None) -> dict[str, float]:
    """Run the loop over `source` to its end; tokens/s from loop start to the last step's end."""
    sink = MetricsSink(work / "metrics.jsonl", ls.run)
    loop = LearnerLoop(trainer, StepFeeder(source, ls, trainer.pad_id, lambda fed, exc: None),
                       ls, RunState(positions=source.start_positions()), store, sink,
                       Ledger(work / "ledger.jsonl"))
    started = time.time()
    loop.run(Until(stop_at_end=True))
    sink.close()
    lines = read_metrics(work / "metrics.jsonl")
    steps = [m for m in lines if "tokens" in m]
    tokens = sum(m["tokens"] for m in steps)
    wall = max(m["time"] for m in steps) - started
    ckpt = [m["checkpoint_s"] for m in lines if m.get("event") == "checkpoint"]
    return {"steps": len(steps), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "step_s": sum(m["step_s"] for m in steps) / len(steps),
            "checkpoint_s": sum(ckpt) / len(ckpt) if ckpt else float("nan")}


def _namespace(settings: Settings) -> str:
    from infra.provision import provision_schemas, provision_topics

    ns = f"bench{uuid.uuid4().hex[:8]}."
    provision_topics(settings.kafka, ns)
    provision_schemas(settings.kafka, settings.registry, ns)
    return ns


def _drop_namespace(settings: Settings, ns: str) -> None:
    from infra.provision import admin_client

    admin = admin_client(settings.kafka)
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(ns)]
    for fut in (admin.delete_topics(names, operation_timeout=30) if names else {}).values():
        fut.result()


def _drop_bucket(client, bucket: str) -> None:
    for obj in client.list_objects(bucket, recursive=True):
        client.remove_object(bucket, obj.object_name)
    client.remove_bucket(bucket)


def kafka_vs_memory(settings: Settings, ls: LearnerSettings, trainer, make_samples, work: Path,
                    seconds: float = 30.0, rounds: int = 3, console=None) -> dict[str, Any]:
    """`make_samples(n)` builds n samples; enough are made for one pass of about `seconds`."""
    import math

    from infra.kafka import EventProducer
    from infra.storage import ensure_bucket, storage_client
    from learner.kafka_source import KafkaSampleSource
    from schemas.serde import registry_client

    registry = registry_client(settings.registry)
    ns, bucket = _namespace(settings), f"bench-{uuid.uuid4().hex[:10]}"
    client = storage_client(settings.storage)
    ensure_bucket(settings.storage, bucket)
    try:
        probe = make_samples(64)
        timed_loop(trainer, MemorySampleSource(probe[:8]), ls, work / "warmup")
        # A short probe is mostly the loop's fixed costs and underestimates the rate (64 tiny
        # samples: 10,480 tokens/s against 28,000 in the passes, which then took 11 s, not
        # 30): grow it until it runs for a fifth of a pass.
        while True:
            calib = timed_loop(trainer, MemorySampleSource(probe), ls, work / f"calibrate-{len(probe)}")
            if calib["wall_s"] >= min(5.0, seconds / 5) or len(probe) >= 16_384:
                break
            probe = make_samples(len(probe) * 4)
        per_sample = calib["tokens"] / len(probe)
        n = max(64, math.ceil(seconds * calib["tokens_per_s"] / per_sample))
        samples = make_samples(n)
        if console is not None:
            console.print(f"  {n} samples (~{seconds:.0f} s a pass at {calib['tokens_per_s']:.0f} tokens/s), "
                          f"{rounds} rounds")
        producer = EventProducer(settings.kafka, registry, ns)
        for s_ in samples:
            producer.send(s_, key=s_.session_id)
        producer.flush(120)

        def kafka_pass(tag: str) -> dict[str, float]:
            source = KafkaSampleSource(settings.kafka, registry, ns, f"{ls.run}-{tag}", None, "beginning")
            if ls.prefetch:   # as the learner reads it (learner.loop)
                source = PrefetchingSource(source, ls.prefetch)
            try:
                return timed_loop(trainer, source, ls, work / f"kafka-{tag}")
            finally:
                source.close()

        passes = []
        for round_ in range(rounds):
            order = ("kafka", "memory") if round_ % 2 == 0 else ("memory", "kafka")
            got = {}
            for kind in order:
                got[kind] = (kafka_pass(str(round_)) if kind == "kafka"
                             else timed_loop(trainer, MemorySampleSource(samples), ls, work / f"memory{round_}"))
            got["ratio"] = got["kafka"]["tokens_per_s"] / got["memory"]["tokens_per_s"]
            passes.append(got)
            if console is not None:
                console.print(f"  round {round_ + 1} ({' then '.join(order)}): kafka "
                              f"{got['kafka']['tokens_per_s']:.0f} tokens/s in {got['kafka']['wall_s']:.1f}s, memory "
                              f"{got['memory']['tokens_per_s']:.0f} tokens/s in {got['memory']['wall_s']:.1f}s, "
                              f"ratio {got['ratio']:.3f}")
        store = CheckpointStore(client, bucket, producer, ns, ls.run, work / "ckpt", "bench")
        every_step = ls.model_copy(update={"checkpoint_every_steps": 1})
        ckpt = timed_loop(trainer, MemorySampleSource(samples[:4]), every_step, work / "ckpt", store)
        return {"passes": passes, "samples": n, "checkpoint_s": ckpt["checkpoint_s"]}
    finally:
        _drop_namespace(settings, ns)
        _drop_bucket(client, bucket)


def smollm2_steps(settings: Settings, lora: bool, steps: int, work: Path) -> dict[str, float]:
    from learner.trainer import Trainer
    from serving.models import resolve_model

    path = resolve_model(settings.serving.model, settings.serving.cache_dir)
    ls = settings.learner.model_copy(update={
        "lora": lora, "device": "cpu", "token_budget": 512, "grad_accum": 1, "run": "bench",
        "loop_guard": _guard_off(settings)})
    trainer = Trainer(ls, path)
    samples = bench_samples(4 * (steps + 1), 64, 64, vocab=trainer.engine.module.config.vocab_size)
    timed_loop(trainer, MemorySampleSource(samples[:4]), ls, work / "warm")  # first-step costs
    out = timed_loop(trainer, MemorySampleSource(samples[4:]), ls, work / "run")
    out["trainable_params"] = trainer.trainable_params
    del trainer
    gc.collect()
    return out


def run_learner_bench(settings: Settings, prompt: int, response: int, model: str | None,
                      smollm2: bool, steps: int, console, seconds: float = 30.0, rounds: int = 3) -> None:
    import statistics

    from learner.trainer import Trainer
    from serving.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="nextstate-bench-") as tmp:
        work = Path(tmp)
        path = Path(model) if model else build_tiny_model(work / "tiny")
        ls = settings.learner.model_copy(update={
            "run": "bench", "device": "cpu", "lora": True, "grad_accum": 1,
            "token_budget": 4 * (prompt + response), "fill_timeout_s": 0.5,
            "loop_guard": _guard_off(settings)})
        trainer = Trainer(ls, path)
        vocab = trainer.engine.module.config.vocab_size
        name = model or "tiny test model"
        console.print(f"[bold]loop fed from Kafka vs memory[/bold] ({name}, LoRA, samples of "
                      f"{prompt}+{response} tokens, 4 per step, loop guard off)")
        r = kafka_vs_memory(settings, ls, trainer, lambda n: bench_samples(n, prompt, response, vocab), work,
                            seconds, rounds, console)
        del trainer
        gc.collect()
        ratios = [p["ratio"] for p in r["passes"]]
        console.print(f"  ratio kafka/memory: median {statistics.median(ratios):.3f}, spread "
                      f"{min(ratios):.3f}..{max(ratios):.3f} over {len(ratios)} rounds")
        console.print(f"  step end -> CheckpointPublished: {r['checkpoint_s'] * 1000:.0f} ms "
                      "(save + sha256 + upload + publish, LoRA)")
        if not smollm2:
            return
        for lora in (True, False):
            m = smollm2_steps(settings, lora, steps, work / f"smollm2-{lora}")
            console.print(f"[bold]SmolLM2-135M {'LoRA' if lora else 'full'}[/bold] "
                          f"({m['trainable_params'] / 1e6:.2f}M trainable, 4x128 tokens/step): "
                          f"{m['step_s']:.2f} s/step, {m['tokens_per_s']:.0f} tokens/s over {m['steps']} steps")
