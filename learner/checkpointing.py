"""Checkpoints of a learner run: save, upload, publish, and find/restore the latest on start.

The order is the exactly-once contract: (1) save weights + optimizer locally, (2) upload every
file with its sha256 (``infra.checkpoints.upload_dir``, manifest last), (3) publish
``CheckpointPublished`` with the next offset of every `samples` partition, and only then (4)
commit the consumer group (the caller does). A learner killed anywhere before (3) leaves no
event, so its restart resumes from the previous checkpoint's offsets and retrains that work
once; after (3) the work is captured and never retrained.

Object layout: ``s3://<bucket>/<namespace>/<run>/v<version:08d>/`` holding ``weights/`` (what
the serving reloader fetches: a peft adapter for LoRA, an HF directory for full) and
``train_state/`` (DeepSpeed optimizer/scheduler state and ``ledger.jsonl``, the ids of the
samples this version trained since its parent). The event's ``files`` lists both; a reloader
only needs the ``weights/`` entries. The namespace is part of the prefix so that a replay
namespace with the same run name never overwrites the live run's objects.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.checkpoints import checkpoint_prefix, download_verified, upload_dir
from infra.errors import LearnerError
from infra.settings import KafkaSettings
from schemas.events import CheckpointKind, CheckpointPublished, PartitionOffset

if TYPE_CHECKING:   # Kafka clients are imported where they are used: a memory-fed run needs none
    from infra.kafka import EventProducer

WEIGHTS_DIR = "weights"
TRAIN_STATE_DIR = "train_state"
LEDGER = "ledger.jsonl"


@dataclass
class RunState:
    """Where a run stands: its policy version, step, and next offset per samples partition."""

    version: int = 0
    step: int = 0
    samples_trained: int = 0
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    parent_event_id: str | None = None

    @classmethod
    def from_event(cls, event: CheckpointPublished) -> "RunState":
        return cls(event.version, event.step, event.samples_trained,
                   {(o.topic, o.partition): o.offset for o in event.consumed_offsets},
                   event.event_id)

    def offsets(self) -> list[PartitionOffset]:
        return [PartitionOffset(topic=t, partition=p, offset=o)
                for (t, p), o in sorted(self.positions.items())]


def latest_checkpoint(kafka: KafkaSettings, registry, namespace: str | None, run: str,
                      timeout: float = 30.0) -> CheckpointPublished | None:
    """Scan the namespace's `checkpoints` topic to its end; the highest version of `run`."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from infra.kafka import EventConsumer, OnDecodeError, ready_partitions

    consumer = EventConsumer(kafka, registry, group_id=f"nextstate-scan-{uuid.uuid4().hex[:8]}",
                             namespace=namespace, on_decode_error=OnDecodeError.SKIP,
                             stage="learner-scan")
    topic = consumer.topic("CheckpointPublished")
    try:
        partitions = ready_partitions(consumer.raw, topic, min(timeout, 10.0))
        if partitions is None:
            raise LearnerError(f"topic {topic!r} does not exist (or has no leader); run `nextstate provision`")
        ends = {p: consumer.raw.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout,
                                                      cached=False)[1] for p in partitions}
        pending = {p for p, high in ends.items() if high > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        best: CheckpointPublished | None = None
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise LearnerError(f"scanning {topic} for run {run!r} did not reach the end "
                                   f"within {timeout:.0f}s (partitions left: {sorted(pending)})")
            record = consumer.poll(0.5)
            if record is not None:
                ev = record.event
                if ev.run == run and (best is None or ev.version > best.version):
                    best = ev
            for tp in consumer.raw.position([TopicPartition(topic, p) for p in list(pending)]):
                if tp.offset >= ends[tp.partition]:
                    pending.discard(tp.partition)
        return best
    finally:
        consumer.close()


class CheckpointStore:
    """Saves, uploads and publishes the checkpoints of one run; restores the latest."""

    def __init__(self, storage_client, bucket: str, producer: EventProducer, namespace: str,
                 run: str, work_dir: Path, base_model: str) -> None:
        self.client = storage_client
        self.bucket = bucket
        self.producer = producer
        self.run = run
        self.prefix_root = f"{namespace.rstrip('.') or 'default'}/{run}"
        self.work_dir = Path(work_dir)
        self.base_model = base_model

    def local_dir(self, version: int) -> Path:
        return self.work_dir / "checkpoints" / f"v{version:08d}"

    def publish(self, trainer, state: RunState, ledger: list[dict[str, Any]],
                metrics: dict[str, float]) -> CheckpointPublished:
        """Save, upload and publish version state.version + 1; `state` is advanced on success."""
        version = state.version + 1
        directory = self.local_dir(version)
        client_state = {"run": self.run, "version": version, "step": state.step,
                        "samples_trained": state.samples_trained,
                        "offsets": [o.model_dump() for o in state.offsets()]}
        trainer.save(directory, client_state)
        with (directory / TRAIN_STATE_DIR / LEDGER).open("w") as fh:
            for line in ledger:
                fh.write(json.dumps(line) + "\n")
        prefix = checkpoint_prefix(self.prefix_root, version)
        files = upload_dir(self.client, self.bucket, prefix, directory)
        event = CheckpointPublished(
            run=self.run,
            version=version,
            parent_version=state.version if state.version > 0 else None,
            parent_ids=[state.parent_event_id] if state.parent_event_id else [],
            kind=CheckpointKind.LORA if trainer.lora else CheckpointKind.FULL,
            base_model=self.base_model,
            uri=f"s3://{self.bucket}/{prefix}",
            files=files,
            consumed_offsets=state.offsets(),
            step=state.step,
            samples_trained=state.samples_trained,
            metrics=metrics,
        )
        self.producer.send(event, key=self.run)
        self.producer.flush()
        state.version, state.parent_event_id = version, event.event_id
        self._prune(keep=version)
        return event

    def restore(self, trainer, event: CheckpointPublished) -> RunState:
        """Download `event`'s files (sha256-checked) and load weights + optimizer from them."""
        if event.kind is not (CheckpointKind.LORA if trainer.lora else CheckpointKind.FULL):
            raise LearnerError(f"checkpoint v{event.version} of run {self.run!r} is {event.kind}, "
                               f"but this learner is configured for "
                               f"{'LoRA' if trainer.lora else 'full'} training")
        directory = download_verified(self.client, event.uri, event.files,
                                      self.work_dir / "restore" / f"v{event.version:08d}")
        trainer.restore(directory)
        return RunState.from_event(event)

    def _prune(self, keep: int) -> None:
        # Local copies are only a staging area; the object store holds every version.
        for old in (self.work_dir / "checkpoints").glob("v*"):
            if old.name != f"v{keep:08d}":
                shutil.rmtree(old, ignore_errors=True)
