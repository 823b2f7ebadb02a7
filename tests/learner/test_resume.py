"""Exactly-once training across a kill -9, on the real Kafka, registry and MinIO.

`nextstate learn` runs as a subprocess on a fresh namespace and bucket with the tiny model,
one sample per step, a checkpoint every 2 steps. Once it has published checkpoints and has
trained one more step that no checkpoint holds yet, it is killed with SIGKILL; more samples
arrive; a second process resumes and stops at the end of the log. The sample ids inside the
*published* checkpoints' ledgers (downloaded from MinIO, sha256-checked) must cover every
sample exactly once; the step the first process trained after its last checkpoint is
retrained by the second, and the final offsets equal the end of every partition.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition

from infra.checkpoints import download_verified
from infra.kafka import EventConsumer, EventProducer
from infra.storage import storage_client
from schemas.events import CheckpointKind
from tests.conftest import wait_for
from tests.learner.samples import make_sample

pytestmark = [pytest.mark.stack, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
RUN = "resume-test"


def produce(settings, registry, namespace, samples) -> None:
    producer = EventProducer(settings.kafka, registry, namespace)
    for s in samples:
        producer.send(s, key=s.session_id)
    producer.flush()


def published(settings, registry, namespace, run=RUN):
    consumer = EventConsumer(settings.kafka, registry, group_id=f"test-{namespace}", namespace=namespace)
    topic = consumer.topic("CheckpointPublished")
    high = consumer.raw.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)[1]
    consumer.assign([TopicPartition(topic, 0, 0)])
    events, seen = [], 0
    while seen < high:
        record = consumer.poll(1.0)
        if record is not None:
            seen = record.offset + 1
            events.append(record.event)
    consumer.close()
    return [e for e in events if e.run == run]


def read_ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trained_ids(line: dict) -> list[str]:
    # Fresh samples are under "train"; those past max_staleness and importance-corrected
    # (these samples are policy version 0 and the run reaches v6) under "correct".
    return line.get("train", []) + line.get("correct", [])


def learner_env(namespace, bucket, work_dir) -> dict[str, str]:
    # In-process learner tests leave this process's torch.distributed rendezvous variables
    # set; a child inheriting them would try to join our group on our port.
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {
        **inherited,
        "NEXTSTATE_KAFKA__NAMESPACE": namespace,
        "NEXTSTATE_LEARNER__BUCKET": bucket,
        "NEXTSTATE_LEARNER__WORK_DIR": str(work_dir),
        "NEXTSTATE_LEARNER__DEVICE": "cpu",
        "NEXTSTATE_LEARNER__METHOD": "rl",
        "NEXTSTATE_LEARNER__LORA": "true",
        "NEXTSTATE_LEARNER__LORA_RANK": "4",
        "NEXTSTATE_LEARNER__LR": "0.001",
        "NEXTSTATE_LEARNER__TOKEN_BUDGET": "7",       # 4 + 3 tokens: one sample per step
        "NEXTSTATE_LEARNER__GRAD_ACCUM": "1",
        "NEXTSTATE_LEARNER__CHECKPOINT_EVERY_STEPS": "2",
        "NEXTSTATE_LEARNER__CHECKPOINT_EVERY_S": "3600",
        "NEXTSTATE_LEARNER__FILL_TIMEOUT_S": "0.2",
    }


def test_kill_9_and_resume_trains_every_sample_exactly_once(settings, registry, namespace, bucket,
                                                            tiny_model_dir, tmp_path):
    first = [make_sample(i) for i in range(7)]
    later = [make_sample(i) for i in range(7, 12)]
    produce(settings, registry, namespace, first)
    env = learner_env(namespace, bucket, tmp_path / "work")
    ledger_path = tmp_path / "work" / namespace.rstrip(".") / RUN / "ledger.jsonl"
    cmd = [sys.executable, "-m", "infra.cli", "learn", "--run", RUN, "--from", "beginning",
           "--model", str(tiny_model_dir)]

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # 7 steps: checkpoints after steps 2, 4 and 6; step 7 is trained but held by none.
        def trained_past_last_checkpoint():
            lines = read_ledger(ledger_path)
            return (sum("published" in line for line in lines) == 3
                    and any(line.get("step") == 7 for line in lines))
        try:
            wait_for(trained_past_last_checkpoint, timeout=240, interval=0.2,
                     what="3 checkpoints and a 7th step trained")
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate(timeout=30)[0].decode(errors="replace")[-3000:])
        assert len(published(settings, registry, namespace)) == 3
    finally:
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    killed_lines = read_ledger(ledger_path)
    unpublished = [i for line in killed_lines if line.get("step") == 7 for i in trained_ids(line)]
    assert len(unpublished) == 1

    produce(settings, registry, namespace, later)
    second = subprocess.run(cmd + ["--stop-at-end"], cwd=ROOT, env=env, capture_output=True,
                            timeout=300)
    assert second.returncode == 0, second.stdout.decode()[-3000:] + second.stderr.decode()[-3000:]

    events = published(settings, registry, namespace)
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    assert all(e.kind is CheckpointKind.LORA for e in events)
    client = storage_client(settings.storage)
    trained = Counter()
    for e in events:
        ledger_files = [f for f in e.files if f.path == "train_state/ledger.jsonl"]
        local = download_verified(client, e.uri, ledger_files, tmp_path / "dl" / f"v{e.version}")
        for line in read_ledger(local / "train_state" / "ledger.jsonl"):
            trained.update(trained_ids(line))
    produced = {s.event_id for s in first + later}
    assert set(trained) == produced
    assert max(trained.values()) == 1, [i for i, n in trained.items() if n > 1]
    assert events[-1].samples_trained == len(produced)

    # What the killed process trained after its last checkpoint was trained again, once.
    local_trained = Counter(i for line in read_ledger(ledger_path) for i in trained_ids(line))
    assert [i for i, n in local_trained.items() if n > 1] == unpublished

    # The last checkpoint's offsets are the end of every partition of the samples topic.
    consumer = EventConsumer(settings.kafka, registry, group_id=f"ends-{namespace}", namespace=namespace)
    ends = {o.partition: o.offset for o in events[-1].consumed_offsets}
    for p, offset in ends.items():
        high = consumer.raw.get_watermark_offsets(TopicPartition(consumer.topic("SampleReady"), p),
                                                  timeout=10, cached=False)[1]
        assert offset == high
    assert sum(ends.values()) == len(produced)
    consumer.close()
    names = {f.path for f in events[-1].files}
    assert {"weights/adapter_config.json", "weights/adapter_model.safetensors"} <= names

    # The group commit follows each published checkpoint (for lag dashboards; resume reads
    # the event, not the group).
    group = EventConsumer(settings.kafka, registry, group_id=f"nextstate-learner-{RUN}",
                          namespace=namespace)
    topic = group.topic("SampleReady")
    committed = group.raw.committed([TopicPartition(topic, p) for p in ends], timeout=10)
    group.close()
    assert {tp.partition: tp.offset for tp in committed} == ends
