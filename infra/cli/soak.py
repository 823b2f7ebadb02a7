"""`nextstate soak`: the whole loop under steady load and a schedule of faults, then the books.

1. A fresh namespace; every part under one restarting supervisor (the way `nextstate up` runs
   them), each processor stage in its own process so each can be killed alone: the gateway
   (hosting the engine), sessionize, judge, hint, assemble, group, the learner. Judges are
   the feedback rules and the method is ``rl``, so every closed turn should become exactly one
   transition, one judgement and one sample.
2. Simulated users talk to the gateway at a steady rate (loopback only, a bounded number in
   flight), give explicit thumbs now and then, and end their sessions every few turns. Every
   request carries its own `X-Request-Id`; what the client saw (answered, refused, failed) is
   kept per request with its latency and the phase it fell in.
3. Faults, in a seeded random order, one every `fault_every_s`: SIGKILL of each part in turn
   (the supervisor restarts it), and, unless `--no-stack-faults`, a broker restart and MinIO
   and the schema registry stopped for `pause_s`.
4. The load stops; the soak waits until the spool, every stage's consumer group and the
   learner have caught up; then it audits the books from the log itself (`audit`).

Prints the result and writes it as JSON. A part the supervisor gave up on, a lost or doubled
turn, a sample trained twice, or a request refused while the gateway was up fails the soak.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from infra.settings import Settings

STAGES = ("sessionize", "judge", "hint", "assemble", "group")
PARTS = ("gateway", *STAGES, "learner")
STACK_FAULTS = ("kafka", "minio", "registry")

REPLIES = ["thanks, that helps", "no, that is wrong, try again", "ok. now something else:",
           "that's not what I asked", "great, thank you"]
QUESTIONS = ["how do I list files?", "rename x to count", "what is a closure?", "explain git rebase",
             "write a haiku about logs", "why is the sky blue?", "sum the numbers 1 to 10"]


@dataclass
class SoakConfig:
    minutes: float = 30.0
    users: int = 4
    think_s: float = 1.0              # each user's pause between requests
    fault_every_s: float = 60.0
    faults: int | None = None         # how many (default: as many as fit)
    targets: list[str] | None = None  # which parts/services to hit (default: all of them)
    stack_faults: bool = True
    pause_s: float = 20.0             # how long MinIO / the registry stay down
    max_tokens: int = 16
    seed: int = 7
    model: str | None = None
    port: int = 30070
    out_dir: Path = Path("out/soak")
    drain_timeout_s: float = 600.0


@dataclass
class Request:
    request_id: str
    kind: str                 # chat | feedback
    phase: str
    status: int               # HTTP status; 0: no answer (connection failed)
    latency_s: float
    gateway_down: bool        # sent while the soak had the gateway killed and not yet healthy


@dataclass
class Fault:
    target: str
    at_s: float
    recovered_s: float | None = None
    note: str = ""


@dataclass
class SoakState:
    requests: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    phase: str = "steady"
    gateway_down: bool = False
    started: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return time.monotonic() - self.started


# -- the load ---------------------------------------------------------------------------------

async def _user(i: int, url: str, key: str, cfg: SoakConfig, state: SoakState, stop: asyncio.Event) -> None:
    rng = random.Random(cfg.seed * 1000 + i)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        while not stop.is_set():
            session = f"soak-u{i}-{uuid.uuid4().hex[:8]}"
            messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
            for turn in range(rng.randint(2, 4)):
                if stop.is_set():
                    return
                last = turn > 0 and rng.random() < 0.5
                reply = await _send(http, "chat", state, {
                    "model": "policy", "messages": messages, "max_tokens": cfg.max_tokens, "temperature": 1.0},
                    {"X-Session-Id": session, **({"X-Session-Done": "1"} if last else {})}, "/v1/chat/completions")
                if reply is not None:
                    text = reply["choices"][0]["message"].get("content") or ""
                    messages = messages + [{"role": "assistant", "content": text},
                                           {"role": "user", "content": rng.choice(REPLIES)}]
                    if rng.random() < 0.3:
                        await _send(http, "feedback", state, {
                            "session_id": session, "kind": "thumbs", "thumbs": rng.choice((1, -1)),
                            "turn_index": reply["nextstate"]["turn_index"]}, {}, "/v1/feedback")
                await asyncio.sleep(cfg.think_s * rng.uniform(0.5, 1.5))
                if last:
                    break


async def _send(http: httpx.AsyncClient, kind: str, state: SoakState, body: dict, headers: dict,
                path: str) -> dict | None:
    rid = uuid.uuid4().hex
    down, phase = state.gateway_down, state.phase
    t0 = time.perf_counter()
    try:
        r = await http.post(path, json=body, headers={**headers, "X-Request-Id": rid})
        status = r.status_code
        payload = r.json() if status == 200 else None
    except (httpx.HTTPError, ValueError):
        status, payload = 0, None
    state.requests.append(Request(rid, kind, phase, status, time.perf_counter() - t0,
                                  down or state.gateway_down))
    if status == 0:
        await asyncio.sleep(0.5)   # the gateway is away: do not spin
    return payload


# -- faults -----------------------------------------------------------------------------------

def _kill_part(parts: Any, name: str) -> int | None:
    pid = parts.parts[name].state.pid if name in parts.parts else None
    if pid is None:
        return None
    try:
        os.killpg(pid, signal.SIGKILL)   # each part is its own process group
    except ProcessLookupError:
        return None
    return pid


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(cond, timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval_s)
    return False


def run_fault(target: str, settings: Settings, parts: Any, url: str, cfg: SoakConfig, state: SoakState) -> Fault:
    from infra.stack import lifecycle
    from infra.stack.procs import stop as stop_proc
    from infra.stack.services import all_services

    fault = Fault(target, state.now())
    state.phase = target
    if target in PARTS:
        if target == "gateway":
            state.gateway_down = True
        pid = _kill_part(parts, target)
        fault.note = f"SIGKILL pid {pid}" if pid else "was not running"

        def back() -> bool:   # restarted by the supervisor (a new pid), and the gateway answering
            now = parts.parts[target].state.pid
            return (now is not None and now != pid and parts.alive(target)
                    and (target != "gateway" or _healthy(url)))

        ok = _wait(back, 300)
        state.gateway_down = False
    else:
        service = next(s for s in all_services(settings.stack, settings.storage) if s.name == target)
        record = lifecycle._ours(service)
        if record is not None:
            stop_proc(record)
        if target != "kafka":
            time.sleep(cfg.pause_s)
        fault.note = "restarted" if target == "kafka" else f"stopped for {cfg.pause_s:.0f}s"
        try:
            lifecycle.up(settings.stack, settings.storage)
            ok = True
        except Exception as exc:  # noqa: BLE001 - reported in the books
            fault.note += f"; restart failed: {exc}"
            ok = False
    fault.recovered_s = state.now() if ok else None
    state.phase = "steady"
    return fault


# -- draining and the books -------------------------------------------------------------------

def _lags(settings: Settings, ns: str) -> dict[str, int]:
    """Records each stage's consumer group has not committed yet, over its input topics."""
    from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition

    from infra.kafka import topic_names
    from infra.provision import admin_client
    from processors.app import app_id
    from processors.topology import stage

    admin = admin_client(settings.kafka)
    topics = topic_names(settings.kafka, ns)
    ends = Consumer({**settings.kafka.client_config(), "group.id": f"soak-lag-{uuid.uuid4().hex[:6]}"})
    out = {}
    try:
        for name in STAGES:
            tps = [TopicPartition(topics[e], p) for e in stage(name).inputs for p in range(settings.kafka.partitions)]
            fut = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(app_id(ns, name), tps)])
            committed = {(tp.topic, tp.partition): tp.offset
                         for tp in next(iter(fut.values())).result().topic_partitions}
            lag = 0
            for tp in tps:
                low, high = ends.get_watermark_offsets(tp, timeout=10)
                lag += high - max(committed.get((tp.topic, tp.partition), -1), low) if high > 0 else 0
            out[name] = lag
    finally:
        ends.close()
    return out


def read_log(settings: Settings, ns: str, names: list[str]) -> dict[str, list[tuple[int, int, Any]]]:
    """Every record of these events in the namespace: name -> [(partition, offset, event)]."""
    from confluent_kafka import TopicPartition

    from infra.kafka import EventConsumer, OnDecodeError
    from schemas.serde import registry_client

    consumer = EventConsumer(settings.kafka, registry_client(settings.registry), f"soak-audit-{uuid.uuid4().hex[:8]}",
                             ns, on_decode_error=OnDecodeError.SKIP)
    topics = sorted({consumer.topic(n) for n in names})
    ends, tps = {}, []
    meta = consumer.raw.list_topics(timeout=10).topics
    for t in topics:
        for p in sorted(meta[t].partitions) if t in meta else []:
            low, high = consumer.raw.get_watermark_offsets(TopicPartition(t, p), timeout=10)
            if high > low:
                ends[(t, p)] = high
                tps.append(TopicPartition(t, p, low))
    consumer.assign(tps)
    seen = {k: -1 for k in ends}
    out: dict[str, list] = defaultdict(list)
    deadline = time.monotonic() + 300
    while any(seen[k] + 1 < ends[k] for k in ends) and time.monotonic() < deadline:
        rec = consumer.poll(1.0)
        if rec is None:
            continue
        seen[(rec.topic, rec.partition)] = rec.offset
        name = type(rec.event).__name__
        if name in names:
            out[name].append((rec.partition, rec.offset, rec.event))
    consumer.close()
    behind = {f"{t}[{p}]": ends[(t, p)] - seen[(t, p)] - 1 for t, p in ends if seen[(t, p)] + 1 < ends[(t, p)]}
    if behind:   # a partial read would make turns look lost
        raise RuntimeError(f"could not read the whole log within 300 s; records left: {behind}")
    return out


def _ledgers(settings: Settings, checkpoints: list[Any]) -> dict[int, list[dict]]:
    """Each published version's ledger (train_state/ledger.jsonl): what it trained."""
    from infra.checkpoints import parse_uri
    from infra.storage import storage_client

    client = storage_client(settings.storage)
    out = {}
    for cp in checkpoints:
        bucket, prefix = parse_uri(cp.uri)
        resp = client.get_object(bucket, prefix.rstrip("/") + "/train_state/ledger.jsonl")
        try:
            out[cp.version] = [json.loads(line) for line in resp.read().decode().splitlines() if line.strip()]
        finally:
            resp.close()
            resp.release_conn()
    return out


def audit(settings: Settings, ns: str, state: SoakState) -> dict[str, Any]:
    """The books, from the log: see the module docstring."""
    from schemas.events import TurnType
    log = read_log(settings, ns, ["TurnRecorded", "TransitionFormed", "RewardJudged", "SampleReady",
                                  "CheckpointPublished", "DeadLettered"])
    turns_by_request: dict[str, set[str]] = defaultdict(set)
    main_turns = {}
    for _, _, t in log["TurnRecorded"]:
        turns_by_request[t.request_id].add(t.event_id)
        if t.turn_type is TurnType.MAIN:
            main_turns[t.event_id] = t
    answered = [r for r in state.requests if r.kind == "chat" and r.status == 200]
    lost = [r.request_id for r in answered if not turns_by_request.get(r.request_id)]
    doubled = [rid for rid, ids in turns_by_request.items() if len(ids) > 1]
    transitions = {tr.event_id: tr for _, _, tr in log["TransitionFormed"]}
    by_turn = Counter(tr.turn.event_id for tr in transitions.values())
    judged = {j.transition_id for _, _, j in log["RewardJudged"]} if log["RewardJudged"] else set()
    samples: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for p, o, s in log["SampleReady"]:
        samples[s.event_id].append((p, o))
    # one sample per transition; hindsight revisions (processors.assemble) come besides them
    revisions = {s.event_id for _, _, s in log["SampleReady"] if s.revision_of}
    sample_parents = {s.parent_ids[1] for _, _, s in log["SampleReady"]
                      if len(s.parent_ids) > 1 and not s.revision_of}
    checkpoints = sorted((c for _, _, c in log["CheckpointPublished"]), key=lambda c: c.version)
    trained: Counter = Counter()    # trained (fresh, or stale with a corrected weight)
    dropped: Counter = Counter()    # too stale: not trained, by the staleness policy
    for lines in _ledgers(settings, checkpoints).values():
        for line in lines:
            for verdict in ("train", "correct"):
                trained.update(line.get(verdict, []))
            dropped.update(line.get("drop", []))
    last = {(o.topic, o.partition): o.offset for o in checkpoints[-1].consumed_offsets} if checkpoints else {}
    samples_topic = settings.kafka.topic("samples", ns)
    before_last = {sid for sid, places in samples.items()
                   if any(o < last.get((samples_topic, p), 0) for p, o in places)}
    books = {
        "requests_sent": sum(1 for r in state.requests if r.kind == "chat"),
        "answered": len(answered),
        "feedback_sent": sum(1 for r in state.requests if r.kind == "feedback"),
        "feedback_answered": sum(1 for r in state.requests if r.kind == "feedback" and r.status == 200),
        "refused_while_gateway_up": sum(1 for r in state.requests if r.status != 200 and not r.gateway_down),
        "failed_while_gateway_down": sum(1 for r in state.requests if r.status != 200 and r.gateway_down),
        "turns_recorded": len({i for ids in turns_by_request.values() for i in ids}),
        "answered_turns_lost": len(lost),
        "turns_recorded_twice": len(doubled),
        "main_turns": len(main_turns),
        "main_turns_not_closed": sum(1 for tid in main_turns if tid not in by_turn),
        "transitions": len(transitions),
        "turns_with_two_transitions": sum(1 for n in by_turn.values() if n > 1),
        "transitions_unjudged": sum(1 for tid in transitions if tid not in judged),
        "transitions_without_sample": sum(1 for tid in transitions if tid not in sample_parents),
        "samples": len(samples) - len(revisions),
        "revisions": len(revisions),
        "checkpoints": len(checkpoints),
        "samples_trained_twice": sum(1 for n in trained.values() if n > 1),
        "samples_dropped_as_stale": len(dropped),
        "samples_before_last_checkpoint_not_trained": sum(1 for sid in before_last
                                                          if trained[sid] == 0 and dropped[sid] == 0),
        "dead_letters": len(log["DeadLettered"]),
    }
    return books


def _latency(state: SoakState) -> dict[str, dict[str, float]]:
    by_phase: dict[str, list[float]] = defaultdict(list)
    for r in state.requests:
        if r.kind == "chat" and r.status == 200:
            by_phase[r.phase].append(r.latency_s)
    out = {}
    for phase, values in by_phase.items():
        values.sort()
        out[phase] = {"n": len(values), "p50_ms": 1000 * values[len(values) // 2],
                      "p99_ms": 1000 * values[min(len(values) - 1, int(0.99 * len(values)))]}
    return out


# -- the run ----------------------------------------------------------------------------------

def run_soak(settings: Settings, cfg: SoakConfig, console: Any) -> dict[str, Any]:
    from infra.cli.demo import launch
    from infra.cli.supervisor import nextstate_argv

    from infra.cli.supervisor import Supervisor

    ns, out, model, key, fail_fast = launch(settings, "soak", "nextstate soak", cfg, console, {
        "NEXTSTATE_PROCESSORS__METHOD": "rl", "NEXTSTATE_LEARNER__METHOD": "rl",
        "NEXTSTATE_PROCESSORS__TIMEOUT_SCAN_S": "1", "NEXTSTATE_PROCESSORS__TRANSITION_TIMEOUT_S": "20",
        "NEXTSTATE_LEARNER__RUN": "soak", "NEXTSTATE_SERVING__CHECKPOINT_RUN": "soak"}, teacher=False)
    # the same parts and settings as the demo's, but restarted when they die (as `nextstate up`)
    parts = Supervisor(out / "parts", fail_fast.env, restart=True, backoff_start_s=0.5)
    url = f"http://127.0.0.1:{cfg.port}"
    argv = {"gateway": ["gateway"], "learner": ["learn"], **{s: ["process", s] for s in STAGES}}
    state = SoakState()
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            parts.poll()
            time.sleep(0.5)

    result: dict[str, Any] = {"namespace": ns, "out": str(out), "config": {k: str(v) for k, v in asdict(cfg).items()}}
    try:
        for name, args in argv.items():
            parts.start(name, nextstate_argv(args))
        threading.Thread(target=watch, name="soak-supervisor", daemon=True).start()
        if not _wait(lambda: _healthy(url), 600):
            raise TimeoutError(f"the gateway did not become healthy; see {out / 'parts'}")
        console.print(f"all parts up; load: {cfg.users} users for {cfg.minutes:g} min, a fault every "
                      f"{cfg.fault_every_s:g}s")
        rng = random.Random(cfg.seed)
        targets = cfg.targets or (list(PARTS) + (list(STACK_FAULTS) if cfg.stack_faults else []))
        n_faults = cfg.faults if cfg.faults is not None else int(cfg.minutes * 60 // cfg.fault_every_s)
        schedule: list[str] = []
        while len(schedule) < n_faults:
            batch = targets[:]
            rng.shuffle(batch)
            schedule += batch
        schedule = schedule[:n_faults]

        async def drive() -> None:
            stop = asyncio.Event()
            users = [asyncio.create_task(_user(i, url, key, cfg, state, stop)) for i in range(cfg.users)]
            end = cfg.minutes * 60
            for i, target in enumerate(schedule):
                at = (i + 1) * min(cfg.fault_every_s, end / (n_faults + 1))
                await asyncio.sleep(max(0.0, at - state.now()))
                console.print(f"[{state.now():6.0f}s] fault {i + 1}/{n_faults}: {target}")
                fault = await asyncio.to_thread(run_fault, target, settings, parts, url, cfg, state)
                state.faults.append(fault)
                console.print(f"[{state.now():6.0f}s]   {fault.note}; recovered "
                              f"{'at %.0fs' % fault.recovered_s if fault.recovered_s else 'NOT'}")
            await asyncio.sleep(max(0.0, end - state.now()))
            stop.set()
            await asyncio.gather(*users)

        asyncio.run(drive())
        console.print(f"load stopped after {state.now():.0f}s; waiting for the pipeline to drain...")
        # every turn closes (the last turn of a session left open closes at the idle timeout,
        # processors.transition_timeout_s) and every stage has consumed its inputs
        drained = _wait(lambda: _all_closed(settings, ns) and all(v == 0 for v in _lags(settings, ns).values()),
                        cfg.drain_timeout_s, interval_s=3.0)   # each look reads the log
        time.sleep(5)   # the learner's idle checkpoint (checkpoint_idle_s) after the last samples
        _wait(lambda: _learner_caught_up(settings, ns), cfg.drain_timeout_s, interval_s=3.0)
        states = json.loads((out / "parts" / "states.json").read_text())
        books = audit(settings, ns, state)
        books["drained"] = drained
        books["parts_given_up"] = [n for n, s in states.items() if s["state"] == "failed"]
        books["restarts"] = {n: s["starts"] - 1 for n, s in states.items()}
        result.update(books=books, latency=_latency(state), faults=[asdict(f) for f in state.faults])
        result["ok"] = (books["answered_turns_lost"] == 0 and books["turns_recorded_twice"] == 0
                        and books["samples_trained_twice"] == 0 and books["turns_with_two_transitions"] == 0
                        and books["main_turns_not_closed"] == 0 and books["transitions_unjudged"] == 0
                        and books["transitions_without_sample"] == 0
                        and books["refused_while_gateway_up"] == 0 and not books["parts_given_up"]
                        and books["samples_before_last_checkpoint_not_trained"] == 0 and drained)
    finally:
        watching.set()
        parts.stop(grace_s=20)
        (out / "soak.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def _all_closed(settings: Settings, ns: str) -> bool:
    from schemas.events import TurnType

    log = read_log(settings, ns, ["TurnRecorded", "TransitionFormed"])
    main = {t.event_id for _, _, t in log["TurnRecorded"] if t.turn_type is TurnType.MAIN}
    return main <= {tr.turn.event_id for _, _, tr in log["TransitionFormed"]}


def _learner_caught_up(settings: Settings, ns: str) -> bool:
    """The newest checkpoint's offsets reach the end of every samples partition."""
    log = read_log(settings, ns, ["CheckpointPublished"])
    cps = [c for _, _, c in log["CheckpointPublished"]]
    if not cps:
        return False
    last = max(cps, key=lambda c: c.version)
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**settings.kafka.client_config(), "group.id": f"soak-end-{uuid.uuid4().hex[:6]}"})
    topic = settings.kafka.topic("samples", ns)
    try:
        done = {(o.topic, o.partition): o.offset for o in last.consumed_offsets}
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return all(done.get((topic, p), 0) >= c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in parts)
    finally:
        c.close()


def print_result(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    books = result.get("books", {})
    table = Table(title=f"soak {result['namespace']} — {'OK' if result.get('ok') else 'FAILED'}")
    table.add_column("books")
    table.add_column("value", justify="right")
    for k, v in books.items():
        table.add_row(k, str(v))
    console.print(table)
    lat = Table(title="answered chat requests by phase")
    for col in ("phase", "n", "p50 ms", "p99 ms"):
        lat.add_column(col, justify="right")
    for phase, v in sorted(result.get("latency", {}).items()):
        lat.add_row(phase, str(v["n"]), f"{v['p50_ms']:.0f}", f"{v['p99_ms']:.0f}")
    console.print(lat)
    console.print(f"results: {result['out']}/soak.json")
