"""The weight reloader: follows the `checkpoints` topic and hot-swaps the engine's weights.

For each batch of CheckpointPublished events it picks the newest version that is newer than
what the engine serves (and of the followed run, if one is configured), downloads only the
files serving needs (``weights/`` when the learner's layout is used: the optimizer state in
``train_state/`` is never fetched) with every sha256 checked, and calls
``engine.load_weights``. A checkpoint whose weight files have the sha256s of the ones being
served (the learner published, but skipped every step since: no answer had a signal) loads
nothing: the engine serves what it has under the new number (``engine.relabel``), so a swap
that changes nothing does not empty the local engine's prefix cache. A checkpoint that fails
(bad checksum, missing object, files the engine cannot load) is logged with the reason,
recorded on `dead-letters`, remembered as bad so it is not retried, and the engine keeps
serving what it had: the loop never crash-loops.

Each replica must see every checkpoint, so the default consumer group is unique per process
and starts from the earliest offset: a restarted server catches up to the newest checkpoint
in one load instead of replaying them all. Knows no engine internals; works with any Engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.checkpoints import download_verified, parse_uri
from infra.kafka import EventConsumer, EventProducer, OnDecodeError, Record
from schemas.events import CheckpointFile, CheckpointKind, CheckpointPublished, DeadLettered
from serving.engine import Engine, WeightsKind

log = logging.getLogger(__name__)

STAGE = "serving-reloader"
WEIGHTS_DIR = "weights"
KINDS = {CheckpointKind.FULL: WeightsKind.FULL, CheckpointKind.LORA: WeightsKind.LORA}


def candidates(events: Iterable[CheckpointPublished], current: int, run: str | None,
               bad: set[tuple[str, int]]) -> list[CheckpointPublished]:
    """Checkpoints worth loading, newest first: newer than `current`, of `run`, not known bad."""
    fresh = {}
    for e in events:
        if e.version <= current or (run is not None and e.run != run) or (e.run, e.version) in bad:
            continue
        fresh.setdefault(e.version, e)
    return [fresh[v] for v in sorted(fresh, reverse=True)]


def serving_files(files: list[CheckpointFile]) -> tuple[list[CheckpointFile], str]:
    """The files serving needs and the sub-directory that holds the weights."""
    weights = [f for f in files if f.path.startswith(WEIGHTS_DIR + "/")]
    if weights:
        return weights, WEIGHTS_DIR
    return [f for f in files if not f.path.startswith("train_state/")], ""


@dataclass
class Swap:
    version: int
    kind: str
    ok: bool
    error: str | None = None
    download_s: float = 0.0
    load_s: float = 0.0
    relabelled: bool = False           # the same weight files as served: nothing was loaded
    event_to_serving_s: float = 0.0   # from the event's occurred_at to the engine serving it
    at: float = 0.0                    # time.monotonic() when the engine started serving it


@dataclass
class Reloader:
    engine: Engine
    consumer: EventConsumer
    storage: Any                       # a Minio client
    cache_dir: Path
    dead_letters: EventProducer | None = None
    run: str | None = None
    bad: set[tuple[str, int]] = field(default_factory=set)
    swaps: list[Swap] = field(default_factory=list)
    batch_max: int = 100
    # what the last load installed: (run, kind, {path: sha256} of its weight files), and the
    # version the engine serves it as
    served: tuple[str, CheckpointKind, frozenset[tuple[str, str]]] | None = None
    served_version: int | None = None

    async def run_forever(self, stop: asyncio.Event | None = None) -> None:
        """Poll, pick, load, commit; until `stop` is set."""
        self.consumer.subscribe(["CheckpointPublished"])
        stop = stop or asyncio.Event()
        while not stop.is_set():
            records = await asyncio.to_thread(self._poll_batch)
            if not records:
                continue
            await self.handle(records)
            await asyncio.to_thread(self.consumer.commit, records)

    def _poll_batch(self) -> list[Record]:
        """Whatever is waiting (up to batch_max), so a backlog costs one load, not many."""
        record = self.consumer.poll(0.5)
        records = [] if record is None else [record]
        while records and len(records) < self.batch_max:
            record = self.consumer.poll(0.01)
            if record is None:
                break
            records.append(record)
        return records

    def close(self) -> None:
        self.consumer.close()
        if self.dead_letters is not None:
            self.dead_letters.flush(10)

    async def handle(self, records: list[Record]) -> Swap | None:
        """Load the newest good checkpoint among `records`; None if none was worth loading."""
        by_id = {id(r.event): r for r in records}
        events = [r.event for r in records if isinstance(r.event, CheckpointPublished)]
        for event in candidates(events, self.engine.info().policy_version, self.run, self.bad):
            swap = await self.load(event, by_id.get(id(event)))
            if swap.ok:
                return swap
        return None

    async def load(self, event: CheckpointPublished, record: Record | None = None) -> Swap:
        files, sub = serving_files(event.files)
        weights = (event.run, event.kind, frozenset((f.path, f.sha256) for f in files))
        if (weights == self.served and self.engine.info().policy_version == self.served_version
                and await self._relabelled(event.version)):
            swap = Swap(event.version, event.kind.value, ok=True, relabelled=True, at=time.monotonic(),
                        event_to_serving_s=time.time() - event.occurred_at.timestamp())
            log.info("checkpoint v%d of run %s has the weight files of v%d: serving them as v%d, "
                     "nothing loaded", event.version, event.run, self.served_version, event.version)
            self.served_version = event.version
            self.swaps.append(swap)
            return swap
        bucket, prefix = parse_uri(event.uri)  # the uri carries namespace, run and version
        dest = Path(self.cache_dir) / "checkpoints" / bucket / prefix.strip("/")
        t0 = time.perf_counter()
        swap = Swap(event.version, event.kind.value, ok=False)
        try:
            path = await asyncio.to_thread(download_verified, self.storage, event.uri, files, dest)
            swap.download_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            await self.engine.load_weights(str(path / sub if sub else path), KINDS[event.kind], event.version)
            swap.load_s = time.perf_counter() - t1
            swap.ok, swap.at = True, time.monotonic()
            self.served, self.served_version = weights, event.version
            swap.event_to_serving_s = time.time() - event.occurred_at.timestamp()
            log.info("serving %s checkpoint v%d of run %s (download %.2fs, load %.2fs)",
                     event.kind.value, event.version, event.run, swap.download_s, swap.load_s)
        except Exception as exc:  # any failure: keep serving the old weights, never retry it
            swap.error = f"{type(exc).__name__}: {exc}"
            self.bad.add((event.run, event.version))
            log.error("checkpoint v%d of run %s not loaded, still serving v%d: %s", event.version,
                      event.run, self.engine.info().policy_version, swap.error)
            self._dead_letter(event, record, exc)
        self.swaps.append(swap)
        return swap

    async def _relabelled(self, version: int) -> bool:
        try:
            return await self.engine.relabel(version)
        except Exception:  # noqa: BLE001 - the checkpoint can still be loaded the usual way
            log.exception("relabelling to v%d failed; loading the checkpoint instead", version)
            return False

    def _dead_letter(self, event: CheckpointPublished, record: Record | None, exc: Exception) -> None:
        if self.dead_letters is None:
            return
        try:
            self.dead_letters.send(DeadLettered.of(
                STAGE, record.topic if record else "", record.partition if record else -1,
                record.offset if record else -1, record.key if record else None, None,
                f"{type(exc).__name__}: checkpoint v{event.version} ({event.uri}): {exc}",
                parent_ids=[event.event_id]), key=event.run)
            self.dead_letters.flush(10)
        except Exception:  # the dead letter is a courtesy; failing it must not stop serving
            log.exception("could not record the bad checkpoint on dead-letters")


def build_reloader(engine: Engine, settings: Any, namespace: str | None = None,
                   group_id: str | None = None) -> Reloader:
    """A Reloader wired to Kafka, the registry and MinIO from the full settings object."""
    from infra.storage import storage_client
    from schemas.serde import registry_client

    registry = registry_client(settings.registry)
    serving = settings.serving
    group = group_id or serving.reload_group or (
        f"nextstate-serving-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    producer = EventProducer(settings.kafka, registry, namespace=namespace)
    consumer = EventConsumer(settings.kafka, registry, group, namespace=namespace,
                             on_decode_error=OnDecodeError.DEAD_LETTER, dead_letters=producer,
                             stage=STAGE)
    return Reloader(engine, consumer, storage_client(settings.storage), serving.cache_dir,
                    dead_letters=producer, run=serving.checkpoint_run)


@contextlib.asynccontextmanager
async def following(engine: Engine, settings: Any, namespace: str | None = None):
    """Run a reloader for `engine` in the current event loop for the duration of the block:
    how a process that hosts the engine in-process (the gateway) gets hot reload."""
    reloader = build_reloader(engine, settings, namespace=namespace)
    stop = asyncio.Event()
    task = asyncio.create_task(reloader.run_forever(stop))
    try:
        yield reloader
    finally:
        stop.set()
        await task
        reloader.close()
