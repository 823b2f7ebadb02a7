"""The faust apps of the processors and the topology, declared in one place.

    TOPOLOGY: sessionize  turns + feedback            → transitions   (table: pending turn per session)
              judge       transitions                 → judgements
              hint        transitions                 → hints         (+ teacher logprobs, in-process)
              assemble    transitions + judgements + hints → samples  (table: join per transition)
              every stage → dead-letters for records it cannot use

Each stage is its own faust app (``app_id(namespace, stage)`` = ``<namespace>processors-<stage>``
is its consumer group and prefixes its changelog topics), so ``nextstate process judge`` and the
judge inside ``nextstate process all`` (one worker process per stage) are the same consumer;
a replay namespace never shares groups or tables with the live one.

Topics are raw bytes in and out; values are decoded/encoded by ``processors.runtime`` with the
registry-bound serdes. Outputs go to the source record's partition with the same key
(session id), so a session's turns, feedback, transitions, judgements and hints share one
partition number whatever client produced them — the stateful joins rely on it. Offset and
state guarantees: see processors.runtime.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import TP

from infra.errors import StackError
from infra.settings import KafkaSettings, Settings
from processors import sessionize as ses
from processors.handlers import (TurnsClock, assemble_handler, hint_handler, judge_handler,
                                 sessionize_handler)
from processors.runtime import Serdes, StageRunner
from processors.teacher import Teacher

log = logging.getLogger("nextstate.processors")


@dataclass(frozen=True)
class StageSpec:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    stateful: bool


TOPOLOGY: dict[str, StageSpec] = {
    "sessionize": StageSpec(("TurnRecorded", "FeedbackReceived"), ("TransitionFormed",), True),
    "judge": StageSpec(("TransitionFormed",), ("RewardJudged",), False),
    "hint": StageSpec(("TransitionFormed",), ("HintJudged",), False),
    "assemble": StageSpec(("TransitionFormed", "RewardJudged", "HintJudged"), ("SampleReady",), True),
}


def app_id(namespace: str, stage: str) -> str:
    return f"{namespace}processors-{stage}"


def timeouts_topic(namespace: str) -> str:
    return f"{namespace}processors-sessionize-timeouts"


@dataclass
class Wiring:
    app: StageApp
    settings: Settings
    namespace: str
    serdes: Serdes
    runner: StageRunner | None = None

    def channel(self, *names: str) -> Any:
        return self.app.topic(*names, key_type=bytes, value_type=bytes,
                              key_serializer="raw", value_serializer="raw")

    def inputs(self, stage: str) -> list[str]:
        return [self.serdes.topics[e] for e in TOPOLOGY[stage].inputs]

    def agent(self, stage: str, channel: Any, handler, concurrency: int = 1,
              raw_topics: frozenset[str] = frozenset()) -> StageRunner:
        outs = {t: self.channel(t) for t in self.serdes.topics.values()}

        async def send(topic: str, key: bytes | None, value: bytes, partition: int | None) -> None:
            fut = await outs[topic].send(key=key, value=value, partition=partition)
            await fut  # delivered (acks=all) before this record is acked; see processors.runtime

        runner = StageRunner(stage, handler, self.serdes, send, raw_topics=raw_topics)
        self.app.stream_topics |= frozenset(channel.topics)

        async def body(stream: Any) -> None:
            async for event in stream.events():
                m = event.message
                headers = dict(m.headers or [])
                await runner.process(m.topic, m.partition, m.offset, m.key, m.value, headers)

        self.app.agent(channel, name=stage, concurrency=concurrency)(body)

        @self.app.timer(interval=30.0)
        async def report() -> None:
            if runner.counts:
                log.info("%s: %s, seconds %s", stage, dict(runner.counts),
                         {k: round(v, 2) for k, v in runner.timing.items()})

        self.runner = runner
        return runner


class StageApp(faust.App):
    """A faust app whose stream partitions with no committed offset are re-read from the start.

    faust acks and commits per record, and at every rebalance (and whenever ``getmany`` runs
    while the flow is stopped) it drops the records it had fetched but not yet delivered, then
    calls ``seek_to_committed`` so the dropped ones are fetched again. aiokafka's
    ``seek_to_committed`` only moves partitions whose committed offset is > 0; a partition this
    group has never committed stays at the position the dropped records had advanced it to, and
    they are never read. That happens to a worker killed before its first commit: its successor
    recovers the tables, drops what it fetched during recovery and skips it for good. Here such
    input partitions are reset to the earliest offset instead (the group's
    ``auto_offset_reset``), which is what a fresh consumer would read; re-reading is harmless,
    every output id is derived from its input. Changelog partitions are left to faust.
    """

    stream_topics: frozenset[str] = frozenset()   # what the stage's agents read (Wiring.agent adds them)

    def _new_consumer(self) -> Any:
        consumer = super()._new_consumer()
        seek_committed = consumer.seek_to_committed

        async def seek_to_committed() -> Any:
            committed = await seek_committed()
            never = [tp for tp, offset in committed.items() if not offset and tp.topic in self.stream_topics]
            if never:
                log.info("%s: no committed offset for %s, reading them from the start",
                         self.conf.id, sorted(f"{tp.topic}[{tp.partition}]" for tp in never))
                await consumer._thread.seek_to_beginning(*never)
            return committed

        consumer.seek_to_committed = seek_to_committed
        return consumer


def ensure_control_topic(kafka: KafkaSettings, name: str) -> None:
    """The sessionize timeout-request topic: same partitions as the event topics, short-lived."""
    from confluent_kafka.admin import NewTopic

    from infra.provision import admin_client

    admin = admin_client(kafka)
    if name in admin.list_topics(timeout=30).topics:
        return
    topic = NewTopic(name, num_partitions=kafka.partitions, replication_factor=kafka.replication_factor,
                     config={"retention.ms": str(24 * 3600 * 1000)})
    for fut in admin.create_topics([topic], request_timeout=30).values():
        try:
            fut.result()
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise StackError(f"cannot create control topic {name!r}: {exc}") from exc


def _table(w: Wiring, name: str) -> Any:
    # Untyped: str keys and dict values travel as plain JSON on the changelog (a typed table
    # would look for faust Record classes when it recovers).
    return w.app.Table(name, partitions=w.settings.kafka.partitions)


def wire_sessionize(w: Wiring, teacher: Teacher | None = None) -> None:
    s = w.settings.processors
    pending = _table(w, "pending")
    control = timeouts_topic(w.namespace)
    ensure_control_topic(w.settings.kafka, control)
    control_topic = w.channel(control)
    channel = w.channel(*w.inputs("sessionize"), control)
    turns = w.serdes.topics["TurnRecorded"]

    async def highwater(partition: int, fresh: bool) -> int:
        # The fetcher's cached end offset (refreshed by every fetch response) costs nothing;
        # the broker is asked when it has none yet or a fresh value is needed.
        tp = TP(turns, partition)
        cached = w.app.consumer.highwater(tp)
        if not fresh and cached is not None and cached >= 0:
            return cached
        return (await w.app.consumer.highwaters(tp)).get(tp) or 0

    async def position(partition: int) -> int | None:
        return await w.app.consumer.position(TP(turns, partition))

    clock = TurnsClock(highwater, position)
    w.agent("sessionize", channel, sessionize_handler(w.settings, pending, clock),
            raw_topics=frozenset({control}))

    @w.app.timer(interval=s.timeout_scan_s)
    async def scan() -> None:
        # Tables can only be changed while a record is processed, so the scan asks the agent
        # (through the control topic, on the session's partition) to check idle turns and
        # turns holding a verdict that waits for the turns stream to catch up.
        now = time.time()
        for k, value in list(pending.items()):
            p = ses.Pending.from_table(value)
            if p is not None and ses.needs_check(p, now, s.transition_timeout_s):
                req = json.dumps({"session_id": k, "turn_id": ses.pending_id(p)})
                await (await control_topic.send(key=k.encode(), value=req.encode(), partition=p.partition))


def wire_judge(w: Wiring, teacher: Teacher | None = None) -> None:
    w.agent("judge", w.channel(*w.inputs("judge")), judge_handler(w.settings),
            concurrency=w.settings.processors.stage_concurrency)


def wire_hint(w: Wiring, teacher: Teacher | None = None) -> None:
    w.agent("hint", w.channel(*w.inputs("hint")), hint_handler(w.settings, teacher),
            concurrency=w.settings.processors.stage_concurrency)


def wire_assemble(w: Wiring, teacher: Teacher | None = None) -> None:
    w.agent("assemble", w.channel(*w.inputs("assemble")), assemble_handler(w.settings, _table(w, "joins")))


WIRES = {"sessionize": wire_sessionize, "judge": wire_judge, "hint": wire_hint,
         "assemble": wire_assemble}


def build_app(settings: Settings, namespace: str, stage: str, teacher: Teacher | None = None) -> Wiring:
    """The faust app of one stage over one namespace's topics."""
    if stage not in WIRES:
        raise ValueError(f"no stage named {stage!r}; known: {sorted(WIRES)}")
    s, k = settings.processors, settings.kafka
    ident = app_id(namespace, stage)
    (s.faust_data_dir / ident).mkdir(parents=True, exist_ok=True)
    app = StageApp(
        ident, broker=f"kafka://{k.bootstrap_servers}", store="memory://",
        datadir=str(s.faust_data_dir / ident), web_enabled=False, autodiscover=False,
        producer_acks=-1, consumer_auto_offset_reset="earliest",
        topic_partitions=k.partitions, topic_replication_factor=k.replication_factor,
        table_standby_replicas=0, stream_wait_empty=True,
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=min(3.0, s.session_timeout_s / 4),
        broker_commit_interval=1.0, producer_max_request_size=k.max_message_bytes,
        consumer_max_fetch_size=k.max_message_bytes,
    )
    w = Wiring(app, settings, namespace, Serdes(settings, namespace))
    WIRES[stage](w, teacher)
    return w


def run_worker(settings: Settings, namespace: str, stage: str, teacher: Teacher | None = None,
               loglevel: str = "warning") -> None:
    """Run one stage's faust worker until SIGINT/SIGTERM."""
    w = build_app(settings, namespace, stage, teacher)
    faust.Worker(w.app, loglevel=loglevel, quiet=True).execute_from_commandline()
