"""`nextstate bench gateway`: the latency the gateway adds over calling the engine directly.

For each concurrency level (default 1, 16, 64 clients) the same engine serves, in the same
run, alternately: direct `engine.generate` calls with the prompt ids rendered once, and the
same chat request through the gateway over HTTP (render, session tracking, engine, decode,
group-committed spool append, JSON), the HTTP clients in a separate process. Greedy sampling
and a fixed `max_tokens` make both sides generate the same tokens. Prints p50/p99 of each side
and their difference, and, measured inside the gateway for every request, its own time: the
request's time in the gateway's app less its waits on the engine (metric
``nextstate_gateway_own_seconds``). The difference of two percentiles moves with the engine's
batching from one request to the next (at 64 clients the engine's p99 alone is hundreds of
ms); the own time does not, but it leaves out HTTP parsing before the app and the extra hop.

Two deployments (`--engine`):
- ``process`` (default): the engine runs in its own process (`nextstate serve`), the gateway
  reaches it with the remote engine, and the direct side calls the same server from the
  client process: the difference is what the gateway process adds.
- ``inline``: the engine runs inside the gateway's process (`nextstate gateway` with
  engine=local); the direct side calls it in that process. The gateway then shares one
  interpreter with the engine, so its work and the engine's slow each other down.

The spool goes to a temporary directory; with `--kafka` it is also drained to a fresh
namespace on the configured Kafka. Default model: the tiny random model (built in a
temporary directory); `--model` takes any spec `serving.models.resolve_model` accepts.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write one short sentence about the sea."}]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _direct(engine: Any, prompt_ids: list[int], params: Any, clients: int, requests: int) -> list[float]:
    latencies: list[float] = []
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            queue.pop()
            t0 = time.perf_counter()
            await engine.generate(prompt_ids, params)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies


async def _through_gateway(url: str, key: str, body: dict[str, Any], clients: int, requests: int) -> list[float]:
    import httpx

    latencies: list[float] = []
    queue = list(range(requests))
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        async def worker(i: int) -> None:
            while queue:
                queue.pop()
                t0 = time.perf_counter()
                r = await http.post("/v1/chat/completions", json=body,
                                    headers={"X-Session-Id": f"bench-{i}"})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return latencies


def _client_process(url: str, key: str, body: dict[str, Any], clients: int, requests: int) -> list[float]:
    return asyncio.run(_through_gateway(url, key, body, clients, requests))


def _direct_process(serving: Any, prompt_ids: list[int], params: Any, clients: int, requests: int) -> list[float]:
    """Direct calls to the engine server from the client process (engine=remote)."""
    from serving.remote import RemoteEngine

    async def go() -> list[float]:
        engine = RemoteEngine(serving)
        try:
            return await _direct(engine, prompt_ids, params, clients, requests)
        finally:
            await engine.close()

    return asyncio.run(go())


def _start_engine_server(settings: Any, model_spec: str, max_batch: int, work: Path) -> tuple[Any, str]:
    """`nextstate serve` on a free port in its own process; (process, url) once it answers."""
    import os
    import subprocess
    import sys

    import httpx

    from producers.gateway.server import free_port

    port = free_port()
    env = {**os.environ, "NEXTSTATE_SERVING__MAX_BATCH_SIZE": str(max_batch)}
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "serve", "--model", model_spec, "--port", str(port),
                             "--engine", "local", "--namespace", f"benchgw{uuid.uuid4().hex[:8]}."],
                            cwd=Path(__file__).resolve().parents[1], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nextstate serve exited with {proc.returncode}; see {work / 'serve.log'}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"nextstate serve did not answer within 300 s; see {work / 'serve.log'}")


def run_gateway_bench(settings: Any, model: str | None, levels: list[int], max_tokens: int,
                      rounds: int, kafka: bool, console: Any, engine_mode: str = "process") -> list[dict[str, float]]:
    from infra import heap
    from producers.gateway.auth import KeyRing, hash_key
    from producers.gateway.server import ServerThread, build_gateway, load_tokenizer
    from schemas.events import SamplingParams
    from serving import create_engine
    from serving.chat import normalize_messages, render_prompt
    from serving.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="nextstate-bench-gw-"))
    model_spec = model or str(build_tiny_model(work / "tiny"))
    serving = settings.serving.model_copy(update={"model": model_spec, "max_batch_size": max(levels)})
    server_proc = None
    if engine_mode == "process":
        server_proc, engine_url = _start_engine_server(settings, model_spec, max(levels), work)
        serving = serving.model_copy(update={"engine": "remote", "engine_url": engine_url})
    engine = create_engine(serving)
    tokenizer = load_tokenizer(engine, serving)
    namespace = None
    if kafka:
        from infra.provision import provision_schemas, provision_topics

        namespace = f"benchgw{uuid.uuid4().hex[:8]}."
        provision_topics(settings.kafka, namespace)
        provision_schemas(settings.kafka, settings.registry, namespace)
    gw_settings = settings.gateway.model_copy(update={"spool_dir": work / "spool"})
    key = uuid.uuid4().hex
    gw = build_gateway(settings.model_copy(update={"gateway": gw_settings}), engine, tokenizer,
                       namespace=namespace, drain=kafka, keys=KeyRing({"bench": hash_key(key)}))
    heap.freeze()   # as `nextstate gateway` does once it has loaded everything (infra.heap)
    prompt_ids = render_prompt(tokenizer, normalize_messages(MESSAGES), None)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, seed=0)
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
    console.print(f"model {model_spec} | prompt {len(prompt_ids)} tokens | max_tokens {max_tokens} | "
                  f"engine {engine.name} ({'its own process' if server_proc else 'in the gateway process'}) | "
                  f"spool {'-> kafka ' + namespace if kafka else 'local only'}")
    rows = []
    try:
        with ServerThread(gw) as server:
            # HTTP clients run in their own process, as real clients do: in this process
            # they would compete with the server for the GIL and be counted as gateway cost.
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            http = lambda c, n: pool.submit(_client_process, server.url, key, body, c, n).result()  # noqa: E731
            if server_proc is not None:
                direct_calls = lambda c, n: pool.submit(_direct_process, serving, prompt_ids, params, c, n).result()  # noqa: E731
            else:
                direct_calls = lambda c, n: asyncio.run(_direct(engine, prompt_ids, params, c, n))  # noqa: E731
            direct_calls(2, 4)  # warm up both paths
            http(2, 4)
            own: list[float] = []
            gw.metrics.own_listeners.append(own.append)   # called on the server's thread
            for clients in levels:
                requests = max(rounds * clients, 48)
                direct, via = [], []
                own.clear()
                cpu = 0.0
                for _ in range(4):  # alternate, so drift in machine load hits both sides alike
                    direct += direct_calls(clients, requests // 4)
                    # this process's CPU while only the gateway works in it (the clients have
                    # their own process; with --engine process, so has the engine)
                    started = time.process_time()
                    via += http(clients, requests // 4)
                    cpu += time.process_time() - started
                row = {"clients": clients, "requests": len(direct),
                       "direct_p50_ms": _pct(direct, 0.5) * 1e3, "direct_p99_ms": _pct(direct, 0.99) * 1e3,
                       "gateway_p50_ms": _pct(via, 0.5) * 1e3, "gateway_p99_ms": _pct(via, 0.99) * 1e3,
                       "direct_mean_ms": statistics.fmean(direct) * 1e3,
                       "gateway_mean_ms": statistics.fmean(via) * 1e3}
                row["added_p50_ms"] = row["gateway_p50_ms"] - row["direct_p50_ms"]
                row["added_p99_ms"] = row["gateway_p99_ms"] - row["direct_p99_ms"]
                row["own_p50_ms"], row["own_p99_ms"] = _pct(own, 0.5) * 1e3, _pct(own, 0.99) * 1e3
                row["gateway_cpu_ms"] = cpu / len(via) * 1e3   # engine included when inline
                rows.append(row)
                console.print(
                    f"clients {clients:>3}  n={len(direct):>4}  direct p50 {row['direct_p50_ms']:8.1f} ms  "
                    f"p99 {row['direct_p99_ms']:8.1f} ms | gateway p50 {row['gateway_p50_ms']:8.1f} ms  "
                    f"p99 {row['gateway_p99_ms']:8.1f} ms | added p50 {row['added_p50_ms']:+7.1f} ms  "
                    f"p99 {row['added_p99_ms']:+7.1f} ms | own p50 {row['own_p50_ms']:5.2f} ms  "
                    f"p99 {row['own_p99_ms']:5.2f} ms | CPU {row['gateway_cpu_ms']:.2f} ms a request"
                    f"{' (engine included)' if server_proc is None else ''}")
            pool.shutdown()
        console.print(f"turns spooled: {gw.spool.appended} with {gw.spool.fsyncs} fsyncs (group commit)")
    finally:
        gw.spool.close()
        asyncio.run(engine.close())
        if server_proc is not None:
            server_proc.terminate()
            try:
                server_proc.wait(30)
            except Exception:  # noqa: BLE001
                server_proc.kill()
        if namespace is not None:
            _drop_namespace(settings, namespace)
    return rows


def _drop_namespace(settings: Any, namespace: str) -> None:
    from infra.provision import admin_client

    admin = admin_client(settings.kafka)
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(namespace)]
    for fut in (admin.delete_topics(names, operation_timeout=30) if names else {}).values():
        fut.result()
