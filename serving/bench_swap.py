"""`nextstate bench swap`: what a hot swap costs while the engine is under load.

On the real stack (a fresh topic namespace and bucket), with the local engine and N
concurrent generate loops: latency while idle of swaps, then a FULL and a LoRA checkpoint
published for real (upload to MinIO, CheckpointPublished on Kafka) and picked up by the
reloader. Reports, per kind: checkpoint event -> first response on the new version, the
reloader's download and load times, p50/p99 generate latency during the swap window vs idle,
and requests refused or failed (must be 0). Also holds the checkpoint builders (a perturbed
full copy, a random LoRA adapter) and the load generator that the hot-reload tests reuse.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.events import SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


def full_variant(base_dir: Path, out: Path, seed: int, scale: float = 1.0) -> Path:
    """`base_dir`'s model with every weight perturbed (noise of `scale` times each tensor's
    spread), saved with its tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.float().std().nan_to_num().clamp_min(1e-3))
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(base_dir) / name).exists():
            shutil.copy(Path(base_dir) / name, Path(out) / name)
    return Path(out)


def lora_adapter(base_dir: Path, out: Path, seed: int, rank: int = 4) -> Path:
    """A peft LoRA adapter for `base_dir`'s model with random, non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return Path(out)


def publish_checkpoint(settings: Any, namespace: str, bucket: str, weights_dir: Path, version: int,
                       kind: str, run: str = "hot", corrupt: bool = False):
    """Upload `weights_dir` in the learner's layout (weights/ + train_state/) to the object
    store and send CheckpointPublished to the namespace's checkpoints topic, as the learner
    does. `corrupt` lies about one file's sha256 in the event (to test refusal)."""
    from infra.checkpoints import checkpoint_prefix, upload_dir
    from infra.kafka import EventProducer
    from infra.storage import storage_client
    from schemas.events import CheckpointKind, CheckpointPublished
    from schemas.serde import registry_client

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        shutil.copytree(weights_dir, staged / "weights")
        (staged / "train_state").mkdir()
        (staged / "train_state" / "optimizer.bin").write_bytes(b"\0" * 1024)  # serving skips it
        prefix = checkpoint_prefix(run, version)
        files = upload_dir(storage_client(settings.storage), bucket, prefix, staged)
    if corrupt:
        victim = next(i for i, f in enumerate(files) if f.path.startswith("weights/"))
        files[victim] = files[victim].model_copy(update={"sha256": "0" * 64})
    event = CheckpointPublished(run=run, version=version, kind=CheckpointKind(kind), base_model="bench",
                                uri=f"s3://{bucket}/{prefix}", files=files, consumed_offsets=[],
                                step=version, samples_trained=0)
    producer = EventProducer(settings.kafka, registry_client(settings.registry), namespace=namespace)
    producer.send(event, key=run)
    producer.flush()
    return event


@dataclass
class Outcome:
    started: float        # time.monotonic()
    ended: float
    wall_end: float       # time.time(), to compare with an event's occurred_at
    version: int | None
    error: str | None


class Load:
    """`concurrency` loops sending generate requests back to back, recording every outcome."""

    def __init__(self, engine: Any, prompts: list[list[int]], concurrency: int = 8,
                 max_new_tokens: int = 16) -> None:
        self.engine, self.prompts, self.concurrency = engine, prompts, concurrency
        self.max_new_tokens = max_new_tokens
        self.outcomes: list[Outcome] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def _loop(self, i: int) -> None:
        params = SamplingParams(temperature=1.0, max_new_tokens=self.max_new_tokens, seed=i)
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                gen = await self.engine.generate(self.prompts[i % len(self.prompts)], params)
                self.outcomes.append(Outcome(t0, time.monotonic(), time.time(), gen.policy_version, None))
            except Exception as exc:  # a failure is a measurement here, not a crash of the load
                self.outcomes.append(Outcome(t0, time.monotonic(), time.time(), None, repr(exc)))

    def start(self) -> None:
        self.stop.clear()
        self.tasks = [asyncio.create_task(self._loop(i)) for i in range(self.concurrency)]

    async def finish(self) -> list[Outcome]:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        return self.outcomes


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def _until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        await asyncio.sleep(0.01)


async def run_swap_bench(settings: Any, model: str | None, concurrency: int, idle_s: float,
                         max_new_tokens: int, console: Any) -> dict[str, Any]:
    from infra.provision import provision_schemas, provision_topics
    from infra.storage import ensure_bucket
    from serving.local import LocalEngine
    from serving.reloader import build_reloader

    work = Path(tempfile.mkdtemp(prefix="nextstate-bench-swap-"))
    namespace = bucket = ""
    try:
        if model is None:
            from serving.tiny import build_tiny_model

            model_dir = build_tiny_model(work / "tiny")
        else:
            from serving.models import resolve_model

            model_dir = resolve_model(model, settings.serving.cache_dir)
        namespace, bucket = f"benchswap{uuid.uuid4().hex[:8]}.", f"benchswap-{uuid.uuid4().hex[:10]}"
        provision_topics(settings.kafka, namespace)
        provision_schemas(settings.kafka, settings.registry, namespace)
        ensure_bucket(settings.storage, bucket)
        serving = settings.serving.model_copy(update={"max_batch_size": concurrency,
                                                      "cache_dir": work / "cache"})
        s = settings.model_copy(update={"serving": serving})
        console.print(f"model {model_dir} | {concurrency} concurrent clients | {max_new_tokens} tokens each")
        full_dir = full_variant(model_dir, work / "full", seed=1)
        lora_dir = lora_adapter(model_dir, work / "lora", seed=2)
        engine = LocalEngine(serving, model_dir=model_dir)
        reloader = build_reloader(engine, s, namespace=namespace)
        stop = asyncio.Event()
        follower = asyncio.create_task(reloader.run_forever(stop))
        prompts = [engine.tokenizer.encode(t) for t in ("Swap benchmark.", "What changed?", "Hello")]
        load = Load(engine, prompts, concurrency, max_new_tokens)
        results: dict[str, Any] = {}
        try:
            load.start()
            await asyncio.sleep(1.0)  # warm up: not measured
            t_idle = time.monotonic()
            await asyncio.sleep(idle_s)
            idle = [o.ended - o.started for o in load.outcomes if o.started >= t_idle and not o.error]
            results["idle"] = {"n": len(idle), "p50": percentile(idle, 50), "p99": percentile(idle, 99)}
            for version, (kind, path) in enumerate((("FULL", full_dir), ("LORA", lora_dir)), start=1):
                n_before = len(load.outcomes)
                t_pub = time.monotonic()
                event = publish_checkpoint(s, namespace, bucket, path, version, kind)
                await _until(lambda v=version: engine.info().policy_version == v, 300)
                await _until(lambda v=version: any(o.version == v for o in load.outcomes[n_before:]), 300)
                swap = next(w for w in reloader.swaps if w.version == version)
                t_end = time.monotonic()
                await asyncio.sleep(idle_s / 2)  # the tail of the window: requests queued by the swap
                window = [o for o in load.outcomes[n_before:] if o.started <= t_end + idle_s / 2]
                first = min(o.wall_end for o in load.outcomes[n_before:] if o.version == version)
                lat = [o.ended - o.started for o in window if not o.error]
                results[kind] = {
                    "event_to_first_response_s": first - event.occurred_at.timestamp(),
                    "event_to_serving_s": swap.event_to_serving_s,
                    "download_s": swap.download_s, "load_s": swap.load_s,
                    "publish_to_serving_s": swap.at - t_pub,
                    "n": len(lat), "p50": percentile(lat, 50), "p99": percentile(lat, 99),
                    "failed": sum(1 for o in window if o.error)}
        finally:
            await load.finish()
            stop.set()
            await follower
            reloader.close()
            await engine.close()
        results["requests"] = len(load.outcomes)
        results["refused_or_failed"] = sum(1 for o in load.outcomes if o.error)
        print_results(results, console)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if namespace:
            remove_namespace(settings, namespace, bucket)


def remove_namespace(settings: Any, namespace: str, bucket: str) -> None:
    """Delete the benchmark's topics and bucket: a benchmark leaves nothing behind."""
    from infra.provision import admin_client
    from infra.storage import storage_client

    admin = admin_client(settings.kafka)
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(namespace)]
    if names:
        for fut in admin.delete_topics(names, operation_timeout=30).values():
            fut.result()
    client = storage_client(settings.storage)
    if client.bucket_exists(bucket):
        for obj in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)


def print_results(results: dict[str, Any], console: Any) -> None:
    idle = results["idle"]
    console.print(f"idle: {idle['n']} requests, p50 {idle['p50'] * 1000:.0f} ms, p99 {idle['p99'] * 1000:.0f} ms")
    for kind in ("FULL", "LORA"):
        r = results.get(kind)
        if r is None:
            continue
        console.print(
            f"{kind:4}: event -> first response on new version {r['event_to_first_response_s'] * 1000:.0f} ms "
            f"(event -> serving {r['event_to_serving_s'] * 1000:.0f} ms: download {r['download_s'] * 1000:.0f} ms, "
            f"load+switch {r['load_s'] * 1000:.0f} ms) | during swap: {r['n']} requests, "
            f"p50 {r['p50'] * 1000:.0f} ms, p99 {r['p99'] * 1000:.0f} ms, failed {r['failed']}")
    console.print(f"requests {results['requests']}, refused or failed {results['refused_or_failed']}")
