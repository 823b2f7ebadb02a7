"""`nextstate bench pipeline`: what the processors sustain, next to what Kafka alone does.

1. Turns → samples per second through every stage (``nextstate process all``: one faust
   worker per stage; ``feedback`` judges, method ``combined``, no teacher), measured from the first
   produced turn to the last consumed sample, in a throwaway namespace. Each session has two
   turns; the user's "thanks" scores the first, a thumbs-up the second, so every turn becomes
   one sample.
2. In the same run, raw Kafka produce+consume of the same serialized turns (no processing):
   the ceiling the pipeline is compared with.
3. The ``llm`` judge's throughput at client concurrency 1 and 8 against an OpenAI-compatible
   endpoint served in-process (an ASGI app over the LocalEngine, called through httpx) on a
   model directory (default: a tiny random model, so the numbers measure the plumbing and the
   engine's batching, not a judge's quality).

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from rich.console import Console
from rich.table import Table

from infra.kafka import EventProducer
from infra.provision import admin_client, provision_schemas, provision_topics
from infra.settings import Settings
from schemas.events import (
    FeedbackKind,
    FeedbackReceived,
    NextStateKind,
    SamplingParams,
    TransitionFormed,
    TurnRecorded,
    TurnType,
)
from schemas.serde import EventSerde, registry_client

REPO = Path(__file__).resolve().parents[1]


def bench_sessions(n_turns: int, response_tokens: int) -> list[list]:
    """Sessions of two turns plus a thumbs-up: every turn yields one RL sample."""
    sessions = []
    for _ in range(max(1, n_turns // 2)):
        sid = str(uuid.uuid4())
        ask = [{"role": "user", "content": "rename the variable x to count"}]

        def turn(i: int, msgs: list) -> TurnRecorded:
            return TurnRecorded(
                tenant="bench", session_id=sid, turn_index=i, turn_type=TurnType.MAIN,
                request_id=str(uuid.uuid4()), messages_json=json.dumps(msgs),
                prompt_token_ids=list(range(1, 129)), response_token_ids=list(range(200, 200 + response_tokens)),
                response_logprobs=[-0.5] * response_tokens, response_text="done", finish_reason="stop",
                sampling=SamplingParams(), policy_version=1, engine="bench", model="bench")

        t0 = turn(0, ask)
        t1 = turn(1, ask + [{"role": "assistant", "content": "done"},
                            {"role": "user", "content": "thanks! now add a docstring"}])
        thumbs = FeedbackReceived(tenant="bench", session_id=sid, turn_index=1, kind=FeedbackKind.THUMBS, thumbs=1)
        sessions.append([t0, t1, thumbs])
    return sessions


def _drop_namespace(settings: Settings, ns: str) -> None:
    admin = admin_client(settings.kafka)
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(ns)]
    if names:
        for fut in admin.delete_topics(names, operation_timeout=60).values():
            fut.result()


def _consumer(settings: Settings, topics: list[str]) -> Consumer:
    c = Consumer({**settings.kafka.client_config(), "group.id": f"bench-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "fetch.message.max.bytes": settings.kafka.max_message_bytes})
    c.subscribe(topics)
    return c


def pipeline_rate(settings: Settings, ns: str, sessions: list[list], console: Console,
                  timeout_s: float = 600.0) -> tuple[float, float, list[float]]:
    """(turns per second from first produce to last sample, the same between the arrival of
    the 10th and the 90th percent of the samples, seconds from the start at which each tenth of
    the samples had arrived)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NEXTSTATE_PROCESSORS__JUDGE": "feedback",
           "NEXTSTATE_PROCESSORS__HINT_JUDGE": "feedback", "NEXTSTATE_PROCESSORS__JUDGE_VOTES": "1",
           "NEXTSTATE_PROCESSORS__METHOD": "combined",
           "NEXTSTATE_PROCESSORS__FAUST_DATA_DIR": tempfile.mkdtemp(prefix="bench-faust-")}
    env.pop("NEXTSTATE_PROCESSORS__TEACHER_MODEL", None)
    log = open(Path(env["NEXTSTATE_PROCESSORS__FAUST_DATA_DIR"]) / "workers.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "process", "all", "--namespace", ns],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    registry = registry_client(settings.registry)
    producer = EventProducer(settings.kafka, registry, namespace=ns)
    serde = EventSerde(registry, "SampleReady", settings.kafka.topic("samples", ns))
    samples = _consumer(settings, [settings.kafka.topic("samples", ns)])
    seen: set[str] = set()
    arrived: list[float] = []   # perf_counter at each new sample

    def wait_samples(want: int, deadline: float) -> None:
        while len(seen) < want:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise TimeoutError(f"{len(seen)}/{want} samples (workers log: {log.name})")
            msg = samples.poll(0.5)
            if msg is not None and not msg.error():
                event_id = serde.deserialize(msg.value()).event_id
                if event_id not in seen:
                    seen.add(event_id)
                    arrived.append(time.perf_counter())

    try:
        warm = sessions[:1]
        with console.status("starting the stage workers and warming up..."):
            for event in warm[0]:
                producer.send(event, key=event.session_id)
            producer.flush()
            wait_samples(2, time.monotonic() + timeout_s)
        start = time.perf_counter()
        for session in sessions[1:]:
            for event in session:
                producer.send(event, key=event.session_id)
        producer.flush()
        want = 2 * len(sessions)
        with console.status(f"waiting for {want - 2} samples..."):
            wait_samples(want, time.monotonic() + timeout_s)
        elapsed = time.perf_counter() - start
        timed = arrived[2:]   # after the warm-up's two
        lo, hi = timed[len(timed) // 10], timed[(9 * len(timed)) // 10 - 1]
        middle = ((9 * len(timed)) // 10 - len(timed) // 10 - 1) / max(hi - lo, 1e-9)
        tenths = [timed[max(0, (i * len(timed)) // 10 - 1)] - start for i in range(1, 11)]
        return 2 * (len(sessions) - 1) / elapsed, middle, tenths
    finally:
        samples.close()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def raw_rate(settings: Settings, ns: str, sessions: list[list]) -> float:
    """Produce and consume the same serialized turns through one topic, no processing."""
    registry = registry_client(settings.registry)
    serde = EventSerde(registry, "TurnRecorded", settings.kafka.topic("turns", ns))
    return raw_records_rate(settings, ns, [(s[0].session_id.encode(), serde.serialize(t))
                                           for s in sessions for t in s[:2]])


def raw_records_rate(settings: Settings, ns: str, values: list[tuple[bytes, bytes]]) -> float:
    """Records per second: `values` (key, serialized value) produced to a fresh topic of the
    namespace and consumed back, nothing else: the ceiling a processing benchmark is set against."""
    topic = settings.kafka.topic("bench-raw", ns)
    admin = admin_client(settings.kafka)   # kept: a collected client cancels its futures
    from confluent_kafka.admin import NewTopic

    for fut in admin.create_topics([NewTopic(topic, settings.kafka.partitions, 1)]).values():
        fut.result()
    p = Producer({**settings.kafka.client_config(), "acks": "all", "enable.idempotence": True,
                  "linger.ms": 5, "compression.type": "lz4"})
    c = Consumer({**settings.kafka.client_config(), "group.id": f"bench-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "fetch.message.max.bytes": settings.kafka.max_message_bytes})
    # Assigned, not subscribed: a group join would dominate a run this short.
    c.assign([TopicPartition(topic, i, OFFSET_BEGINNING) for i in range(settings.kafka.partitions)])
    start = time.perf_counter()
    for key, value in values:
        while True:
            try:
                p.produce(topic, key=key, value=value)
                break
            except BufferError:
                p.poll(0.1)
    p.flush(60)
    got = 0
    while got < len(values):
        msg = c.poll(1.0)
        if msg is not None and not msg.error():
            got += 1
    elapsed = time.perf_counter() - start
    c.close()
    return len(values) / elapsed


async def llm_rates(model_dir: Path, calls: int, levels: tuple[int, ...] = (1, 8)) -> dict[int, tuple[float, float]]:
    """Judge calls per second and mean latency (ms) at each client concurrency."""
    import httpx

    from infra.settings import ServingSettings
    from processors.judge import judge_transition
    from processors.judges.llm import ChatClient, LLMRewardJudge
    from serving.local import LocalEngine

    engine = LocalEngine(ServingSettings(max_batch_size=8), model_dir=model_dir)
    tok = engine.tokenizer

    async def app(scope, receive, send):  # POST /v1/chat/completions, non-streaming
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        req = json.loads(body)
        ids = tok(tok.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        gen = await engine.generate(ids, SamplingParams(temperature=req.get("temperature", 0.6),
                                                        max_new_tokens=req.get("max_tokens", 32)))
        out = json.dumps({"choices": [{"message": {"role": "assistant",
                                                   "content": tok.decode(gen.token_ids)}}]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})

    ask = [{"role": "user", "content": "rename x"}]
    turn = TurnRecorded(tenant="bench", session_id="s", turn_index=0, turn_type=TurnType.MAIN, request_id="r",
                        messages_json=json.dumps(ask), prompt_token_ids=[1, 2], response_token_ids=[3],
                        response_logprobs=[-1.0], response_text="renamed", finish_reason="stop",
                        sampling=SamplingParams(), policy_version=0, engine="bench", model="bench")
    results = {}
    try:
        for level in levels:
            client = ChatClient(url="http://judge/v1", model="local", concurrency=level, max_tokens=32,
                                transport=httpx.ASGITransport(app=app), timeout_s=600)
            judge = LLMRewardJudge(client)
            transitions = [TransitionFormed(tenant="bench", session_id=f"s{i}", turn_index=0, turn=turn,
                                            next_state_kind=NextStateKind.NEXT_TURN,
                                            next_messages_json=json.dumps([{"role": "user", "content": "no, y"}]))
                           for i in range(calls)]
            await judge_transition(transitions[0], judge, 1)  # warm up
            start = time.perf_counter()
            judged = await asyncio.gather(*(judge_transition(t, judge, 1) for t in transitions))
            elapsed = time.perf_counter() - start
            results[level] = (calls / elapsed, sum(j.votes[0].latency_ms for j in judged) / calls)
            await client.close()
    finally:
        await engine.close()
    return results


def run_pipeline_bench(settings: Settings, turns: int, response_tokens: int, llm_calls: int,
                       model: str | None, console: Console) -> None:
    ns = f"bench{uuid.uuid4().hex[:8]}."
    provision_topics(settings.kafka, ns)
    provision_schemas(settings.kafka, settings.registry, ns)
    sessions = bench_sessions(turns + 2, response_tokens)
    try:
        rate, middle, tenths = pipeline_rate(settings, ns, sessions, console)
        raw = raw_rate(settings, ns, sessions)
    finally:
        _drop_namespace(settings, ns)
    table = Table(title=f"turns → samples ({2 * (len(sessions) - 1)} turns, {response_tokens} response tokens)")
    table.add_column("path")
    table.add_column("turns/s", justify="right")
    table.add_row("pipeline: sessionize → judge + hint → assemble, group (feedback judges, "
                  "a faust worker per stage)", f"{rate:,.0f}")
    table.add_row("  the same from the 10th to the 90th percent of the samples", f"{middle:,.0f}")
    table.add_row("raw Kafka produce + consume of the same turns", f"{raw:,.0f}")
    table.add_row("pipeline / raw", f"{rate / raw:.1%} (10–90 %: {middle / raw:.1%})")
    console.print(table)
    console.print("seconds by which each tenth of the samples had arrived: "
                  + " ".join(f"{t:.1f}" for t in tenths))
    if llm_calls <= 0:
        return
    if model is None:
        from serving.tiny import build_tiny_model

        model_dir = build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-tiny-")))
    else:
        model_dir = Path(model)
    with console.status(f"llm judge: {llm_calls} calls at concurrency 1 and 8 on {model_dir.name}..."):
        rates = asyncio.run(llm_rates(model_dir, llm_calls))
    t2 = Table(title=f"llm judge on the local engine ({model_dir}), 1 vote per call, ≤32 new tokens")
    for col in ("client concurrency", "calls/s", "mean call latency ms (incl. queueing)"):
        t2.add_column(col, justify="right")
    for level, (cps, lat) in rates.items():
        t2.add_row(str(level), f"{cps:.2f}", f"{lat:.0f}")
    console.print(t2)
