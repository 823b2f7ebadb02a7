"""`nextstate bench envs`: what the general-agent layer costs and sustains.

1. **Sandbox start overhead**: the same trivial program (``pass``) run as a plain subprocess and
   in the sandbox (producers.envs.sandbox: namespaces, tmpfs, prlimit, its own uid), alternated.
2. **Episodes per second** at several concurrencies: tool-call tasks played by the runner through
   an in-process gateway serving a model (default: the tiny random model, so the numbers measure
   the runner, the gateway, the environment and its sandbox, not a model), each reply prefilled
   with a code block opening so every step runs code in the sandbox; turns and episodes
   recorded to a throwaway namespace on the configured Kafka.
3. **Group stage throughput**: steps → samples per second through the ``group`` faust worker
   (transitions, judgements and episode ends of G groups of n rollouts), from the first produced
   record to the last sample, next to raw Kafka produce+consume of the same serialized records in
   the same run.

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console

from infra.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- 1. the sandbox --------------------------------------------------------------------------

async def sandbox_overhead(runs: int) -> dict[str, float]:
    from producers.envs.sandbox import Limits, Sandbox, default_python

    box = Sandbox(Limits(wall_s=20, cpu_s=10))
    python = default_python()
    plain, boxed = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(python, "-I", "-c", "pass", stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)
        await proc.wait()
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ran = await box.run_python("pass")
        boxed.append(time.perf_counter() - t0)
        if not ran.ok:
            raise RuntimeError(f"the sandbox failed a trivial program: {ran.describe()}")
    return {"plain_p50_ms": _pct(plain, 0.5) * 1e3, "sandbox_p50_ms": _pct(boxed, 0.5) * 1e3,
            "plain_mean_ms": statistics.fmean(plain) * 1e3, "sandbox_mean_ms": statistics.fmean(boxed) * 1e3,
            "isolation": box.isolation}


# -- 2. episodes through the gateway -------------------------------------------------------------

def episode_rates(settings: Settings, ns: str, model: str | None, levels: list[int], episodes: int,
                  console: Console) -> list[dict[str, float]]:
    from infra.kafka import EventProducer
    from producers.envs.runner import Runner
    from producers.envs.toolcall import generate_tasks
    from producers.gateway.auth import KeyRing, hash_key
    from producers.gateway.server import ServerThread, build_gateway, load_tokenizer
    from schemas.serde import registry_client
    from serving import create_engine
    from serving.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="nextstate-bench-envs-"))
    spec = model or str(build_tiny_model(work / "tiny"))
    serving = settings.serving.model_copy(update={"model": spec, "max_batch_size": max(levels)})
    engine = create_engine(serving)
    key = uuid.uuid4().hex
    gw = build_gateway(settings.model_copy(update={"gateway": settings.gateway.model_copy(
        update={"spool_dir": work / "spool"})}), engine, load_tokenizer(engine, serving), namespace=ns, drain=True,
        keys=KeyRing({"bench": hash_key(key)}))
    sink = EventProducer(settings.kafka, registry_client(settings.registry), namespace=ns)
    rows = []
    console.print(f"model {spec} | engine {engine.name} | tool-call tasks, 1 rollout each, 2 steps at most, "
                  "max_tokens 24, replies prefilled with ```python\\nprint( (so each step runs in the sandbox)")
    try:
        with ServerThread(gw) as server:
            import httpx

            for level in levels:
                env = settings.envs.model_copy(update={"concurrency": level, "max_tokens": 24, "max_steps": 2,
                                                       "prefill": "```python\nprint("})
                tasks = generate_tasks(max(episodes, level), seed=level, prefix=f"bench{level}")

                async def play() -> tuple[float, list[Any]]:
                    async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                                 headers={"Authorization": f"Bearer {key}"}) as client:
                        runner = Runner(client, sink, env)
                        await runner.run_tasks(tasks[:1], 1, group_prefix="warm-")   # warm up
                        t0 = time.perf_counter()
                        groups = await runner.run_tasks(tasks, 1, group_prefix=f"c{level}-")
                        return time.perf_counter() - t0, groups

                elapsed, groups = asyncio.run(play())
                played = [p for g in groups for p in g]
                steps = sum(p.ended.steps for p in played)
                row = {"concurrency": level, "episodes": len(played), "steps": steps,
                       "episodes_per_s": len(played) / elapsed, "steps_per_s": steps / elapsed,
                       "tool_runs": sum(p.tool_runs for p in played),
                       "errors": sum(p.ended.ended.value == "ERROR" for p in played)}
                rows.append(row)
                console.print(f"concurrency {level:>3}: {row['episodes']} episodes, {steps} steps, "
                              f"{row['tool_runs']} tool runs, {row['errors']} errors in {elapsed:.1f}s: "
                              f"{row['episodes_per_s']:.2f} episodes/s, {row['steps_per_s']:.2f} steps/s")
        sink.flush(60)
    finally:
        gw.spool.close()
        asyncio.run(engine.close())
    return rows


# -- 3. the group stage --------------------------------------------------------------------------

def group_events(groups: int, n: int, steps: int, response_tokens: int, prefix: str) -> list[list[Any]]:
    """Per group, its records in the order a live run produces them: per step the transition and
    its judgement, then each rollout's end."""
    import random

    from schemas.events import (
        EpisodeEnd,
        EpisodeEnded,
        EpisodeRef,
        JudgeVote,
        NextStateKind,
        RewardJudged,
        SamplingParams,
        TransitionFormed,
        TurnRecorded,
        TurnType,
    )

    rng = random.Random(0)
    out = []
    for g in range(groups):
        gid = f"{prefix}{g}"
        records: list[Any] = []
        for k in range(n):
            sid = f"{gid}.0.{k}"
            ep = EpisodeRef(task_id=gid, group_id=gid, rollout_index=k, env="toolcall", env_version="1")
            for t in range(steps):
                turn = TurnRecorded(
                    tenant="bench", session_id=sid, turn_index=t, turn_type=TurnType.MAIN, request_id=uuid.uuid4().hex,
                    messages_json="[]", prompt_token_ids=list(range(100, 164 + 32 * t)),
                    response_token_ids=[rng.randrange(1000) for _ in range(response_tokens)],
                    response_logprobs=[-0.5] * response_tokens, response_text="x", finish_reason="stop",
                    sampling=SamplingParams(), policy_version=0, engine="bench", model="bench", episode=ep)
                tf = TransitionFormed(tenant="bench", session_id=sid, turn_index=t, turn=turn,
                                      next_state_kind=NextStateKind.FEEDBACK)
                score = rng.choice((-1, 0, 1))
                rj = RewardJudged(tenant="bench", session_id=sid, turn_index=t, transition_id=tf.event_id,
                                  turn_id=turn.event_id, judge="feedback", judge_model="rules", judge_version="1",
                                  prompt_sha256="0" * 64, votes=[JudgeVote(index=0, raw_text="", score=score)],
                                  majority=score, vote_mean=float(score))
                records += [tf, rj]
            records.append(EpisodeEnded(task_id=gid, group_id=gid, rollout_index=k, session_id=sid,
                                        outcome=rng.choice((1.0, -1.0, -0.6)), verifier="bench",
                                        verifier_version="1", ended=EpisodeEnd.ANSWERED, steps=steps, group_size=n))
        out.append(records)
    return out


def group_stage_rate(settings: Settings, ns: str, groups: list[list[Any]], console: Console,
                     timeout_s: float = 600.0) -> tuple[float, int]:
    """(steps per second from the first produced record to the last sample, samples seen)."""
    from infra.kafka import EventProducer
    from processors.bench_pipeline import _consumer
    from schemas.serde import EventSerde, registry_client

    data = tempfile.mkdtemp(prefix="bench-group-faust-")
    env = {**os.environ, "PYTHONPATH": str(REPO), "NEXTSTATE_PROCESSORS__FAUST_DATA_DIR": data}
    log = open(Path(data) / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "process", "group", "--namespace", ns],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    registry = registry_client(settings.registry)
    producer = EventProducer(settings.kafka, registry, namespace=ns)
    serde = EventSerde(registry, "SampleReady", settings.kafka.topic("samples", ns))
    samples = _consumer(settings, [settings.kafka.topic("samples", ns)])
    seen: set[str] = set()
    per_group = sum(1 for e in groups[0] if type(e).__name__ == "TransitionFormed")

    def wait(want: int) -> None:
        deadline = time.monotonic() + timeout_s
        while len(seen) < want:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise TimeoutError(f"{len(seen)}/{want} samples (worker log: {log.name})")
            msg = samples.poll(0.5)
            if msg is not None and not msg.error():
                seen.add(serde.deserialize(msg.value()).event_id)

    def send(records: list[Any]) -> None:
        for e in records:
            producer.send(e, key=_key_of(e))

    try:
        with console.status("starting the group worker and warming up..."):
            send(groups[0])
            producer.flush()
            wait(per_group)
        start = time.perf_counter()
        for records in groups[1:]:
            send(records)
        producer.flush()
        with console.status(f"waiting for {per_group * (len(groups) - 1)} samples..."):
            wait(per_group * len(groups))
        return per_group * (len(groups) - 1) / (time.perf_counter() - start), len(seen)
    finally:
        samples.close()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _key_of(e: Any) -> str:
    if hasattr(e, "turn"):
        return e.turn.episode.group_id
    if hasattr(e, "group_id"):
        return e.group_id
    return e.session_id


def raw_group_rate(settings: Settings, ns: str, groups: list[list[Any]]) -> float:
    """Records per second: the same serialized records produced and consumed through one topic."""
    from processors.bench_pipeline import raw_records_rate
    from schemas.catalog import TOPICS
    from schemas.serde import EventSerde, registry_client

    registry = registry_client(settings.registry)
    serdes: dict[str, EventSerde] = {}
    values = []
    for records in groups[1:]:
        for e in records:
            name = type(e).__name__
            serde = serdes.setdefault(name, EventSerde(registry, name, settings.kafka.topic(TOPICS[name], ns)))
            values.append((_key_of(e).encode(), serde.serialize(e)))
    return raw_records_rate(settings, ns, values)


def run_envs_bench(settings: Settings, model: str | None, levels: list[int], episodes: int, sandbox_runs: int,
                   groups: int, group_size: int, steps: int, console: Console) -> dict[str, Any]:
    from infra.provision import provision_schemas, provision_topics
    from processors.bench_pipeline import _drop_namespace

    out: dict[str, Any] = {}
    console.rule("1. sandbox start overhead")
    try:
        o = asyncio.run(sandbox_overhead(sandbox_runs))
        out["sandbox"] = o
        console.print(f"{sandbox_runs} runs of `python -I -c pass` ({o['isolation']} isolation): plain p50 "
                      f"{o['plain_p50_ms']:.1f} ms (mean {o['plain_mean_ms']:.1f}), sandboxed p50 "
                      f"{o['sandbox_p50_ms']:.1f} ms (mean {o['sandbox_mean_ms']:.1f}), overhead p50 "
                      f"{o['sandbox_p50_ms'] - o['plain_p50_ms']:+.1f} ms")
    except Exception as exc:   # noqa: BLE001 - a machine without namespaces still gets the other numbers
        console.print(f"sandbox: {exc}", markup=False)
    ns = f"benchenvs{uuid.uuid4().hex[:8]}."
    provision_topics(settings.kafka, ns)
    provision_schemas(settings.kafka, settings.registry, ns)
    try:
        console.rule("2. episodes per second (runner → gateway → environment, recorded to Kafka)")
        out["episodes"] = episode_rates(settings, ns, model, levels, episodes, console)
        console.rule(f"3. group stage: {groups} groups × {group_size} rollouts × {steps} steps")
        evs = group_events(groups + 1, group_size, steps, 32, "bench-g")
        rate, seen = group_stage_rate(settings, ns, evs, console)
        raw = raw_group_rate(settings, ns, evs)
        records_per_step = sum(len(g) for g in evs[1:]) / (groups * group_size * steps)
        out["group_stage"] = {"steps_per_s": rate, "samples": seen, "raw_records_per_s": raw,
                              "raw_steps_per_s": raw / records_per_step}
        console.print(f"group stage: {rate:.0f} steps/s → samples ({seen} samples); raw Kafka of the same "
                      f"records: {raw:.0f} records/s = {raw / records_per_step:.0f} steps/s "
                      f"({records_per_step:.2f} records per step)")
    finally:
        _drop_namespace(settings, ns)
    return out
