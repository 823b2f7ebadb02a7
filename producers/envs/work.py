"""Where rollouts come from: a laptop's one process (`nextstate envs run`) or workers on the
`tasks` topic (`nextstate envs issue` + `nextstate envs worker`).

**Scale-out on the log.** TaskIssued records are keyed by group, so the `tasks` topic's
partitions spread groups over a consumer group of workers (parallelism = partitions). A worker
takes up to ``groups_in_flight`` tasks, plays each group's n rollouts (producers.envs.runner),
waits until every EpisodeEnded is delivered and only then commits those tasks. While they play
it keeps polling with its partitions paused, so however long a group takes it stays a member of
the consumer group. A worker killed
mid-group never committed it: the task is delivered again and rerun as a new attempt (the
attempt number is the second the rerun began, counted from 2025-01-01, so it is distinct and
later), and the group stage takes the first attempt that completes. A TaskIssued whose spec is
not a JSON object is dead-lettered (the record kept, the reason named) and committed.

Knows nothing about faust.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import KafkaException

from infra.settings import Settings
from producers.envs.base import EnvError, Task
from producers.envs.runner import EpisodeSink, Played, Runner, check_id, task_of
from schemas.events import DeadLettered, EpisodeEnd, TaskIssued

log = logging.getLogger("nextstate.envs")

_EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp()


def rerun_attempt() -> int:
    """A worker's attempt number: the second its run of the group began, since 2025-01-01."""
    return int(time.time() - _EPOCH)


def load_tasks(path: Path, default_env: str | None = None) -> list[Task]:
    """Tasks from a JSONL file, one object per line: ``task_id``, ``env`` (or the default),
    ``spec`` (an object) and optionally ``seed``; EnvError names the first bad line."""
    tasks = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise EnvError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise EnvError(f"{path}:{n}: a task is a JSON object, got {type(row).__name__}")
        env = row.get("env") or default_env
        if not isinstance(row.get("task_id"), str) or not row["task_id"] or not env or not isinstance(row.get("spec"), dict):
            raise EnvError(f"{path}:{n}: a task needs 'task_id' (text), 'env' and 'spec' (an object); "
                           f"got keys {sorted(row)}")
        seed = row.get("seed", 0)
        if not isinstance(seed, int):
            raise EnvError(f"{path}:{n}: 'seed' must be an integer")
        try:
            check_id("task id", row["task_id"])
        except EnvError as exc:
            raise EnvError(f"{path}:{n}: {exc}") from None
        tasks.append(Task(row["task_id"], env, row["spec"], seed))
    return tasks


def gateway_client(settings: Settings) -> httpx.AsyncClient:
    """A client of the gateway the rollouts go through, with its key."""
    from infra.http import async_client
    from infra.settings import Profile
    from producers.gateway.auth import dev_key

    e, g = settings.envs, settings.gateway
    url = e.gateway_url or f"http://{g.host}:{g.port}"
    if e.api_key is not None:
        key = e.api_key.get_secret_value()
    elif settings.profile is Profile.LOCAL:
        key = dev_key(g.dev_key_file)
    else:
        raise EnvError("no gateway key for the rollouts: set NEXTSTATE_ENVS__API_KEY")
    return async_client(url, headers={"Authorization": f"Bearer {key}"}, timeout=e.request_timeout_s,
                        max_connections=max(16, e.concurrency * 2))


@dataclass
class GroupSummary:
    task_id: str
    group_id: str
    rollouts: int
    answered: int
    correct: int
    with_tools: int
    errors: int
    mean_outcome: float

    @classmethod
    def of(cls, task: Task, group_id: str, played: Sequence[Played]) -> "GroupSummary":
        ends = [p.ended for p in played]
        return cls(task.task_id, group_id, len(played), sum(e.ended is EpisodeEnd.ANSWERED for e in ends),
                   sum(bool(p.correct) for p in played), sum(p.tool_runs > 0 for p in played),
                   sum(e.ended is EpisodeEnd.ERROR for e in ends),
                   sum(e.outcome for e in ends) / max(1, len(ends)))


async def run_local(runner: Runner, tasks: Sequence[Task], n: int, group_prefix: str = "") -> list[GroupSummary]:
    """Every task's group in this process (attempt 0), all in flight together."""
    groups = await runner.run_tasks(tasks, n, attempt=0, group_prefix=group_prefix)
    return [GroupSummary.of(t, f"{group_prefix}{t.task_id}", g) for t, g in zip(tasks, groups)]


async def work(runner: Runner, consumer: Any, dead_letters: Any, stop: asyncio.Event,
               groups_in_flight: int = 1, max_tasks: int | None = None) -> int:
    """Consume TaskIssued until `stop` (or `max_tasks`), commit each batch after its groups'
    EpisodeEnded events are delivered. Returns the number of tasks run."""
    done = 0
    while not stop.is_set() and (max_tasks is None or done < max_tasks):
        batch = []
        want = max(1, groups_in_flight if max_tasks is None else min(groups_in_flight, max_tasks - done))
        while len(batch) < want and not stop.is_set():
            record = await asyncio.to_thread(consumer.poll, 0.5 if batch else 1.0)
            if record is None:
                if batch:
                    break
                continue
            batch.append(record)
        if not batch:
            continue
        runs = []
        for record in batch:
            ev: TaskIssued = record.event
            if not isinstance(ev, TaskIssued):
                continue
            try:
                task = task_of(ev)
            except EnvError as exc:
                raw = dead_letters.serde("TaskIssued").serialize(ev)   # the record, as it was decoded
                dead_letters.send(DeadLettered.of("envs-worker", record.topic, record.partition, record.offset,
                                                  record.key, raw, exc), key=record.key)
                log.warning("dead-lettered task %s: %s", ev.task_id, exc)
                continue
            runs.append(runner.run_group(task, ev.group_id, ev.group_size, rerun_attempt()))
        playing = asyncio.Event()
        keeper = asyncio.create_task(_stay_in_group(consumer, playing))
        try:
            await asyncio.gather(*runs)
        finally:
            playing.set()
            await keeper
        await asyncio.to_thread(dead_letters.flush, 30.0)
        try:
            await asyncio.to_thread(consumer.commit, batch)
        except KafkaException as exc:
            # the partitions moved to another worker meanwhile (a rebalance): it plays these
            # tasks again as a new attempt, and the group stage takes the first complete one
            log.warning("could not commit %d task(s) (%s); their new owner reruns them", len(batch), exc)
        done += len(batch)
        log.info("played %d task(s), %d in all", len(batch), done)
    return done


async def _stay_in_group(consumer: Any, done: asyncio.Event) -> None:
    """While groups play (minutes), keep polling with the partitions paused: the worker stays a
    live member of its consumer group however long a group takes, and reads nothing new. A record
    that arrives anyway (a partition assigned meanwhile) is sought back, to be read after."""
    from confluent_kafka import TopicPartition

    raw = consumer.raw
    raw.pause(raw.assignment())
    try:
        while not done.is_set():
            msg = await asyncio.to_thread(raw.poll, 0.5)
            if msg is not None and not msg.error():
                raw.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
                raw.pause([TopicPartition(msg.topic(), msg.partition())])
    finally:
        raw.resume(raw.assignment())


def issue(sink: EpisodeSink, tasks: Sequence[Task], n: int, tenant: str = "default",
          group_prefix: str = "") -> list[TaskIssued]:
    """Publish tasks for workers: one TaskIssued per task, keyed by its group."""
    from producers.envs.runner import issued

    events = [issued(t, f"{group_prefix}{t.task_id}", n, tenant) for t in tasks]
    for e in events:
        sink.send(e, key=e.key)
    sink.flush(60.0)
    return events
