"""`nextstate bench codec`: what a TurnRecorded costs on the wire, and the broker's ceiling.

Prints numbers; asserts nothing. Compares, on the same event (a 1,000-token response):
the registry-bound Avro serde with packed token arrays (what nextstate uses), plain fastavro
with ``array<int>``/``array<float>`` (the alternative the packed layout replaced), and orjson;
then raw produce+consume of the serialized events through the local broker, in a throwaway
namespace that is deleted afterwards.
"""

from __future__ import annotations

import io
import json
import random
import time
import uuid
from typing import Any, Callable

import fastavro
import orjson
from rich.console import Console
from rich.table import Table

from infra.settings import Settings
from schemas.catalog import schema_for
from schemas.events import SamplingParams, TurnRecorded, TurnType


def sample_turn(prompt_tokens: int, response_tokens: int, seed: int = 0) -> TurnRecorded:
    rng = random.Random(seed)
    messages = [{"role": "system", "content": "You are a helpful agent."},
                {"role": "user", "content": "Fix the failing test in tests/test_io.py, please."}]
    return TurnRecorded(
        tenant="bench", session_id=str(uuid.uuid4()), turn_index=3, turn_type=TurnType.MAIN,
        request_id=str(uuid.uuid4()), messages_json=json.dumps(messages),
        prompt_token_ids=[rng.randrange(49152) for _ in range(prompt_tokens)],
        response_token_ids=[rng.randrange(49152) for _ in range(response_tokens)],
        response_logprobs=[-rng.random() * 3 for _ in range(response_tokens)],
        response_text="x" * (response_tokens * 4), finish_reason="stop",
        sampling=SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=1024),
        policy_version=12, engine="local", model="SmolLM2-135M-Instruct",
    )


def _rate(fn: Callable[[], Any], n: int) -> tuple[float, Any]:
    fn()  # warm caches (schema ids, parsed schemas)
    start = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn()
    return n / (time.perf_counter() - start), out


def _array_schema() -> Any:
    """TurnRecorded with plain Avro arrays instead of packed bytes, for comparison."""
    schema = json.loads(schema_for("TurnRecorded").schema_str())
    for field in schema["fields"]:
        t = field["type"]
        if isinstance(t, dict) and t.get("logicalType") == "int32-le-array":
            field["type"] = {"type": "array", "items": "int"}
        elif isinstance(t, dict) and t.get("logicalType") == "float32-le-array":
            field["type"] = {"type": "array", "items": "float"}
    return fastavro.parse_schema(schema)


def codec_rows(turn: TurnRecorded, n: int, registry_client) -> list[tuple[str, int, float, float]]:
    from schemas.serde import EventSerde

    serde = EventSerde(registry_client, "TurnRecorded", f"bench-{uuid.uuid4().hex[:8]}.turns")
    enc_rate, wire = _rate(lambda: serde.serialize(turn), n)
    dec_rate, _ = _rate(lambda: serde.deserialize(wire), n)
    rows = [("avro packed, registry serde (used)", len(wire), enc_rate, dec_rate)]

    parsed = _array_schema()
    record = turn.model_dump()

    def enc_arrays() -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, record)
        return buf.getvalue()

    a_enc, a_wire = _rate(enc_arrays, n)
    a_dec, _ = _rate(lambda: fastavro.schemaless_reader(io.BytesIO(a_wire), parsed), n)
    rows.append(("avro array<int>/array<float>", len(a_wire), a_enc, a_dec))

    j_enc, j_wire = _rate(lambda: orjson.dumps(turn.model_dump(mode="json")), n)
    j_dec, _ = _rate(lambda: TurnRecorded.model_validate(orjson.loads(j_wire)), n)
    rows.append(("orjson (model_dump json)", len(j_wire), j_enc, j_dec))
    return rows


def broker_rows(settings: Settings, turn: TurnRecorded, n: int, registry_client) -> list[tuple[str, float, float]]:
    from infra.kafka import EventConsumer, EventProducer
    from infra.provision import admin_client, provision_topics

    namespace = f"bench-{uuid.uuid4().hex[:8]}."
    provision_topics(settings.kafka, namespace)
    producer = EventProducer(settings.kafka, registry_client, namespace)
    topic = producer.topic("TurnRecorded")
    wire = producer.serde("TurnRecorded").serialize(turn)
    rows = []
    try:
        start = time.perf_counter()
        for i in range(n):
            producer.send_raw(topic, wire, key=f"s{i % 64}")
        producer.flush(120)
        elapsed = time.perf_counter() - start
        rows.append(("produce pre-serialized (acks=all, idempotent)", n / elapsed, n * len(wire) / elapsed / 1e6))

        start = time.perf_counter()
        for i in range(n):
            producer.send(turn, key=f"s{i % 64}")
        producer.flush(120)
        elapsed = time.perf_counter() - start
        rows.append(("serialize + produce", n / elapsed, n * len(wire) / elapsed / 1e6))

        for label, decode in (("consume raw bytes", False), ("consume + decode to model", True)):
            consumer = EventConsumer(settings.kafka, registry_client, f"bench-{uuid.uuid4().hex}",
                                     namespace, **{"fetch.max.bytes": 64 * 1024 * 1024})
            consumer.subscribe(["TurnRecorded"])
            seen, start, first = 0, None, None
            deadline = time.monotonic() + 120
            while seen < 2 * n and time.monotonic() < deadline:
                msg = consumer.raw.poll(1.0)
                if msg is None or msg.error():
                    continue
                start = start or time.perf_counter()
                if decode:
                    consumer.decode(msg)
                seen += 1
            elapsed = time.perf_counter() - (start or time.perf_counter())
            consumer.close()
            rows.append((label, seen / elapsed if elapsed else 0.0, seen * len(wire) / elapsed / 1e6 if elapsed else 0.0))
    finally:
        admin = admin_client(settings.kafka)
        names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(namespace)]
        for fut in admin.delete_topics(names, operation_timeout=30).values():
            fut.result()
    return rows


def run_codec_bench(settings: Settings, n: int, prompt_tokens: int, response_tokens: int,
                    broker: bool, console: Console) -> None:
    from schemas.serde import registry_client

    client = registry_client(settings.registry)
    turn = sample_turn(prompt_tokens, response_tokens)
    table = Table(title=f"TurnRecorded, {prompt_tokens}+{response_tokens} tokens, {n} records, one core")
    for col in ("codec", "bytes", "encode rec/s", "decode rec/s"):
        table.add_column(col, justify="right" if col != "codec" else "left")
    for name, size, enc, dec in codec_rows(turn, n, client):
        table.add_row(name, f"{size:,}", f"{enc:,.0f}", f"{dec:,.0f}")
    console.print(table)
    if broker:
        table = Table(title=f"through the local broker ({settings.kafka.bootstrap_servers})")
        for col in ("path", "records/s", "MB/s"):
            table.add_column(col, justify="right" if col != "path" else "left")
        for name, rate, mbs in broker_rows(settings, turn, n, client):
            table.add_row(name, f"{rate:,.0f}", f"{mbs:,.1f}")
        console.print(table)
