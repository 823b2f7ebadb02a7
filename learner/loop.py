"""The learner's main loop: consume samples → batch → train → maybe checkpoint → repeat.

`learn()` wires a run together (model, DeepSpeed engine, Kafka source, object store, the
latest checkpoint of the run) and hands it to `LearnerLoop.run()`, which is the loop itself.
Exactly-once: offsets advance only past records whose step has finished; a checkpoint
captures them, and the consumer group is committed only after the checkpoint's event is
published (see `learner.checkpointing`). Every step also appends a line to the run's local
trained ledger (``ledger.jsonl``: sample ids by verdict and the version they go into).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import StorageError
from infra.settings import LearnerSettings, Settings
from learner.checkpointing import CheckpointStore, RunState, latest_checkpoint
from learner.feeder import StepFeeder
from learner.metrics import MetricsSink
from learner.sources import PrefetchingSource

log = logging.getLogger(__name__)


@dataclass
class Until:
    """When a run stops: caught up with the log, a step count, or an outside signal."""

    stop_at_end: bool = False
    max_steps: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)


class Ledger:
    """The run's local record of what every step trained, read by tests and the audit view."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, line: dict[str, Any]) -> dict[str, Any]:
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
        return line


class LearnerLoop:
    def __init__(self, trainer, feeder: StepFeeder, ls: LearnerSettings, state: RunState,
                 store: CheckpointStore | None, sink: MetricsSink, ledger: Ledger,
                 commit=lambda offsets: None) -> None:
        self.trainer, self.feeder, self.ls, self.state = trainer, feeder, ls, state
        self.store, self.sink, self.ledger, self.commit = store, sink, ledger, commit
        self.pending: list[dict[str, Any]] = []   # ledger lines no published checkpoint holds yet
        self.metrics: dict[str, float] = {}
        self.steps_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.last_step = time.monotonic()
        self.checkpoint_failures = 0      # publishes the object store refused, in a row
        self.retry_checkpoint_at = 0.0    # after one, no new try before this

    def run(self, until: Until) -> RunState:
        state = self.state
        while not until.stop.is_set():
            step = self.feeder.next_step(state.version)
            if step.idle:
                if self._checkpoint_due(idle=True):
                    self.checkpoint()
                if until.stop_at_end and self.feeder.source.at_end():
                    break
                continue
            if step.batches:
                self.metrics = self.trainer.train_step(step.batches)
                state.step += 1
                state.samples_trained += sum(len(b.sample_ids) for b in step.batches)
                self.steps_since_checkpoint += 1
                self.last_step = time.monotonic()
                self._record_metrics()
            for fed in step.handled:
                key = (fed.topic, fed.partition)
                state.positions[key] = max(state.positions.get(key, 0), fed.offset + 1)
            self.pending.append(self.ledger.append(
                {"step": state.step, "version": state.version + 1, **step.verdicts,
                 "positions": {f"{t}:{p}": o for (t, p), o in sorted(state.positions.items())}}))
            if self._checkpoint_due(idle=False):
                self.checkpoint()
            if until.max_steps is not None and state.step >= until.max_steps:
                break
        if self.pending:
            self.checkpoint(final=True)
        return state

    def _checkpoint_due(self, idle: bool) -> bool:
        """Every N steps, every T seconds, and once the feed has been quiet for a while with
        trained steps unpublished: a caught-up learner must not sit on its latest weights
        until the next sample happens to arrive."""
        if self.store is None or not self.pending:
            return False
        now = time.monotonic()
        if now < self.retry_checkpoint_at:
            return False
        if now - self.last_checkpoint >= self.ls.checkpoint_every_s:
            return True
        if idle:
            return self.steps_since_checkpoint > 0 and now - self.last_step >= self.ls.checkpoint_idle_s
        return self.steps_since_checkpoint >= self.ls.checkpoint_every_steps

    def checkpoint(self, final: bool = False) -> None:
        """Publish the steps trained since the last one. `final` (the run is stopping): a store
        that refuses is an error, not something to retry later."""
        if self.store is None:
            self.pending.clear()
            return
        started = time.monotonic()
        counters = {f"samples_{k}": float(v) for k, v in self.feeder.staleness.verdicts.items()}
        try:
            event = self.store.publish(self.trainer, self.state, self.pending,
                                       {**self.metrics, **counters})
        except StorageError as exc:
            if final:
                raise
            # The object store is away (measured by `nextstate soak`: MinIO stopped for 20 s
            # made the learner exit mid-upload). Nothing was published and the state did not
            # advance: keep training, keep the ledger lines, try again after a backoff.
            self.checkpoint_failures += 1
            wait = min(60.0, 2.0 ** self.checkpoint_failures)
            self.retry_checkpoint_at = time.monotonic() + wait
            log.warning("checkpoint v%d not published (%s); training goes on, next try in %.0fs",
                        self.state.version + 1, exc, wait)
            return
        self.checkpoint_failures, self.retry_checkpoint_at = 0, 0.0
        self.commit(event.consumed_offsets)   # only now: the event holds these offsets
        seconds = time.monotonic() - started
        self.ledger.append({"published": event.version, "step": event.step, "uri": event.uri,
                            "event_id": event.event_id})
        self.sink.record_checkpoint(event.version, event.step, seconds, event.uri)
        log.info("published v%d of run %s at step %d in %.2fs", event.version, event.run,
                 event.step, seconds)
        self.pending.clear()
        self.steps_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()

    def _record_metrics(self) -> None:
        counter = self.feeder.staleness
        self.sink.record(self.state.step, self.state.version, self.metrics,
                         {str(k): v for k, v in counter.verdicts.items()}, counter.histogram())


def run_dir(ls: LearnerSettings, namespace: str) -> Path:
    return ls.work_dir / (namespace.rstrip(".") or "default") / ls.run


def learn(settings: Settings, run: str | None = None, namespace: str | None = None,
          start: str = "beginning", model: str | None = None, until: Until | None = None) -> RunState:
    """Run (or resume) a learner run until `until` says stop; the state it ended in."""
    from infra.kafka import EventProducer
    from infra.storage import ensure_bucket, storage_client
    from learner.kafka_source import KafkaSampleSource, dead_letter_invalid
    from learner.trainer import Trainer
    from schemas.serde import registry_client
    from serving.models import resolve_model

    ls = settings.learner.model_copy(update={"run": run}) if run else settings.learner
    ns = settings.kafka.namespace if namespace is None else namespace
    spec = model or ls.model or settings.serving.model
    model_path = resolve_model(spec, settings.serving.cache_dir)
    trainer = Trainer(ls, model_path)
    registry = registry_client(settings.registry)
    producer = EventProducer(settings.kafka, registry, ns)
    bucket = ls.bucket or settings.storage.bucket
    ensure_bucket(settings.storage, bucket)
    work = run_dir(ls, ns)
    store = CheckpointStore(storage_client(settings.storage), bucket, producer, ns, ls.run, work,
                            base_model=str(spec or model_path))
    latest = latest_checkpoint(settings.kafka, registry, ns, ls.run)
    state = store.restore(trainer, latest) if latest else RunState()
    if latest:
        log.info("run %s resumes from v%d (step %d); --from is ignored", ls.run, latest.version, latest.step)
    source = KafkaSampleSource(settings.kafka, registry, ns, ls.run,
                               latest.consumed_offsets if latest else None, start, dead_letters=producer)
    if ls.prefetch:
        source = PrefetchingSource(source, ls.prefetch)
    state.positions = source.start_positions()
    sink = MetricsSink(work / "metrics.jsonl", ls.run, ls.metrics_port)
    feeder = StepFeeder(source, ls, trainer.pad_id, dead_letter_invalid(producer, ls.run),
                        vocab_size=trainer.vocab_size)
    try:
        return LearnerLoop(trainer, feeder, ls, state, store, sink, Ledger(work / "ledger.jsonl"),
                           commit=source.commit).run(until or Until())
    finally:
        source.close()
        sink.close()
        producer.flush()
