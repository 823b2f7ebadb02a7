"""Imports follow need: a part pulls in the clients of what it talks to, and nothing else.
A fresh interpreter each time, so that nothing imported by other tests hides a heavy import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HEAVY = ("minio", "confluent_kafka", "prometheus_client", "faust", "deepspeed")


def _imported(code: str) -> list[str]:
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import sys
        print("imported:" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("imported:"), out.stdout
    return [m for m in line.removeprefix("imported:").split(",") if m]


def test_a_local_engine_on_a_local_directory_imports_no_object_store_or_kafka_client(tiny_model_dir):
    assert _imported(f"""
        import asyncio
        from infra.settings import ServingSettings
        from serving import create_engine
        engine = create_engine(ServingSettings(), model_dir={str(tiny_model_dir)!r})
        assert engine.info().max_context > 0
        asyncio.run(engine.close())
    """) == []


def test_benchmark_helpers_and_pure_parts_import_without_broker_clients():
    assert _imported("""
        import learner.bench, learner.losses, learner.feeder, learner.loop
        import processors.topology, processors.assemble, processors.sessionize
        import schemas.methods, serving.chat
        assert learner.bench.bench_samples(2, 4, 3, 50)[0].problem() is None
    """) == []
