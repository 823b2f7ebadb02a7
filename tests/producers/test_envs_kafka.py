"""General agents end to end on the real stack: the runner plays groups of rollouts through the
gateway (tiny model, OpenAI API), the processors (sessionize, the rule judge, the group stage,
each a real faust worker) turn them into samples whose advantages are exactly the step-wise
normalisation of the recorded outcomes and vote means; a broken task and an environment that
raises end their rollouts with a reason, and nothing waits for them."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from infra.settings import EnvSettings
from processors.advantages import stepwise
from producers.envs.base import Task
from producers.envs.runner import Runner
from producers.envs.work import GroupSummary, run_local
from producers.gateway.server import ServerThread
from schemas.events import (
    EpisodeEnd,
    EpisodeEnded,
    EpisodeStarted,
    FeedbackReceived,
    RewardJudged,
    SampleReady,
    TurnRecorded,
)
from tests.conftest import wait_for
from tests.processors.helpers import Collector
from tests.producers import envs_fixture  # noqa: F401  (registers parity-test and slow-test)
from tests.producers.gateway_fixtures import engine, keyring, make_gateway, tokenizer  # noqa: F401
from tests.producers.helpers import KEYS

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_groups_of_rollouts_become_samples_with_step_wise_advantages(settings, registry, namespace,
                                                                     make_gateway, engine, workers):
    from infra.kafka import EventProducer

    for stage in ("sessionize", "judge", "group"):
        workers(stage)
    gw = make_gateway(engine, namespace=namespace, drain=True)
    sink = EventProducer(settings.kafka, registry, namespace=namespace)
    tasks = [Task(f"t{i}", "parity-test", {"q": f"count to {i}"}) for i in range(2)]
    broken = Task("bad", "parity-test", {"explode": True})
    falls = Task("falls", "parity-test", {"q": "x", "raise_in_step": True})
    hangs = Task("hangs", "parity-test", {"q": "y", "hang_verifier": True})
    unknown = Task("nowhere", "no-such-env", {})
    n = 3
    with ServerThread(gw) as server:
        async def play():
            async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                         headers={"Authorization": f"Bearer {KEYS['acme']}"}) as client:
                runner = Runner(client, sink, EnvSettings(max_steps=3, concurrency=4, max_tokens=6,
                                                          verifier_timeout_s=1.0))
                return await run_local(runner, [*tasks, broken, falls, hangs, unknown], n)

        summaries: list[GroupSummary] = asyncio.run(play())
        wait_for(lambda: gw.spool.depth == 0, 60, what="the gateway's spool drained")
    sink.flush(30)
    assert [(s.task_id, s.rollouts, s.errors) for s in summaries] == [("t0", 3, 0), ("t1", 3, 0), ("bad", 3, 3),
                                                                      ("falls", 3, 3), ("hangs", 3, 3), ("nowhere", 3, 3)]

    out = Collector(settings, registry, namespace, "SampleReady", "EpisodeEnded", "EpisodeStarted",
                    "RewardJudged", "TurnRecorded", "FeedbackReceived")
    wait_for(lambda: len(out.unique(SampleReady)) >= 12, 180, what="12 samples (2 groups x 3 rollouts x 2 steps)")
    samples = list(out.unique(SampleReady).values())
    ends = {e.session_id: e for e in out.events(EpisodeEnded)}
    starts = out.events(EpisodeStarted)
    assert len(ends) == 18 and len({s.session_id for s in starts}) == 18
    assert {e.detail for e in ends.values() if e.task_id == "bad"} == {"EnvError: this task is broken on purpose"}
    assert all(e.ended is EpisodeEnd.ERROR and "no-such-env" in e.detail for e in ends.values() if e.task_id == "nowhere")
    assert {(e.detail, e.steps) for e in ends.values() if e.task_id == "falls"} == {
        ("RuntimeError: the environment fell over", 1)}
    assert {(e.detail, e.steps) for e in ends.values() if e.task_id == "hangs"} == {("the verifier ran past 1s", 2)}
    assert all(e.steps == 2 and e.ended is EpisodeEnd.ANSWERED for e in ends.values() if e.task_id.startswith("t"))

    # every record of a rollout is keyed by its group: the turns, the feedback, the episodes
    keyed = [r for r in out.records if isinstance(r.event, (TurnRecorded, FeedbackReceived, EpisodeEnded))]
    for r in keyed:
        group = r.event.episode.group_id if isinstance(r.event, TurnRecorded) else r.event.group_id
        assert r.key == group.encode(), (type(r.event).__name__, r.key, group)

    # the advantages are the step-wise normalisation of what was recorded
    judged = {j.transition_id: j.vote_mean for j in out.events(RewardJudged)}
    for group in ("t0", "t1"):
        mine = [s for s in samples if s.task_group == group]
        assert len(mine) == 6 and {s.group_size for s in mine} == {3}
        rewards = {}
        for s in mine:
            outcome = ends[s.session_id].outcome
            assert s.outcome == outcome and s.process_reward in (-1.0, 0.0, 1.0)
            assert s.step_reward == pytest.approx(outcome + s.process_reward)
            rewards.setdefault(int(s.session_id.rsplit(".", 1)[1]), {})[s.step_index] = s.step_reward
            transition = s.parent_ids[1]
            assert judged[transition] == s.process_reward
        expected = stepwise({k: [v[t] for t in sorted(v)] for k, v in rewards.items()})
        for s in mine:
            adv = expected[int(s.session_id.rsplit(".", 1)[1])][s.step_index]
            assert s.advantage == pytest.approx(adv.advantage, abs=1e-5) and s.normaliser == adv.normaliser
            assert s.loss_mask == [1 if adv.trained else 0] * len(s.response_token_ids)
    out.close()

    # the audit walks from a sample to its episode, its group and every vote
    from rich.console import Console

    from infra.cli.audit import lineage, render, resolve
    from infra.eventlog import read_log

    log = read_log(settings, namespace)
    item = next(i for i in log if isinstance(i.event, SampleReady) and i.event.task_group == "t0")
    lin = lineage(log, resolve(log, item.event.event_id)[0])
    assert lin.episode is not None and lin.episode.session_id == item.event.session_id
    assert len(lin.group_ends) == 3 and len(lin.group_samples) == 6 and lin.judgements[0].votes
    console = Console(record=True, width=220)
    render(lin, console)
    text = console.export_text()
    assert "group t0: 3 rollouts ended, 6 step samples" in text and f"{item.event.advantage:+.3f}" in text


def test_a_worker_killed_mid_group_leaves_the_task_to_the_next_attempt(settings, registry, namespace, make_gateway,
                                                                       engine, workers, tmp_path):
    """`nextstate envs worker` commits a task only after its n EpisodeEnded: killed mid-group, the
    task is delivered again, rerun as a later attempt, and the group stage emits that attempt."""
    import os
    import signal
    import subprocess
    import sys

    from confluent_kafka import ConsumerGroupTopicPartitions

    from infra.kafka import EventProducer
    from infra.provision import admin_client
    from producers.envs.work import issue
    from tests.processors.helpers import REPO

    for stage in ("sessionize", "judge", "group"):
        workers(stage)
    gw = make_gateway(engine, namespace=namespace, drain=True)
    issue(EventProducer(settings.kafka, registry, namespace=namespace),
          [Task("slow", "slow-test", {"q": "take your time", "sleep_s": 3.0})], 3)
    out = Collector(settings, registry, namespace, "SampleReady", "EpisodeEnded", "EpisodeStarted")
    with ServerThread(gw) as server:
        env = {**os.environ, "PYTHONPATH": str(REPO), "NEXTSTATE_ENVS__GATEWAY_URL": server.url,
               "NEXTSTATE_ENVS__API_KEY": KEYS["acme"], "NEXTSTATE_ENVS__MAX_TOKENS": "6",
               "NEXTSTATE_ENVS__MODULES": '["tests.producers.envs_fixture"]',
               "NEXTSTATE_ENVS__SESSION_TIMEOUT_S": "6"}
        cmd = [sys.executable, "-m", "infra.cli", "envs", "worker", "--namespace", namespace]

        def start(name: str) -> subprocess.Popen:
            return subprocess.Popen([*cmd, *(["--max-tasks", "1"] if name == "second" else [])], cwd=REPO, env=env,
                                    stdout=open(tmp_path / f"worker-{name}.log", "wb"), stderr=subprocess.STDOUT)

        first = start("first")
        try:
            wait_for(lambda: len(out.events(EpisodeStarted)) >= 3, 90,
                     what=f"the first worker's rollouts\n{(tmp_path / 'worker-first.log').read_text()[-2000:]}")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        assert not out.events(EpisodeEnded)   # killed before any rollout ended
        second = start("second")
        try:
            assert second.wait(180) == 0, (tmp_path / "worker-second.log").read_text()[-3000:]
        finally:
            if second.poll() is None:
                second.kill()
        wait_for(lambda: gw.spool.depth == 0, 60, what="the gateway's spool drained")
    wait_for(lambda: len(out.unique(SampleReady)) >= 6, 120, what="the second attempt's 6 samples")
    starts = out.events(EpisodeStarted)
    attempts = sorted({s.attempt for s in starts})
    assert len(attempts) == 2 and attempts[0] < attempts[1]
    ends = out.events(EpisodeEnded)
    assert {e.attempt for e in ends} == {attempts[1]} and len(ends) == 3
    samples = list(out.unique(SampleReady).values())
    assert len(samples) == 6 and all(s.session_id.startswith(f"slow.{attempts[1]}.") for s in samples)
    consumer_group = f"{namespace}envs-worker"
    admin = admin_client(settings.kafka)
    committed = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(consumer_group)])[consumer_group]
    assert sum(tp.offset for tp in committed.result().topic_partitions if tp.offset > 0) == 1   # the task, once
    out.close()


def test_a_worker_dead_letters_a_malformed_task_and_plays_the_next(settings, registry, namespace, make_gateway,
                                                                   engine):
    from infra.kafka import EventConsumer, EventProducer, OnDecodeError
    from producers.envs.runner import issued
    from producers.envs.work import work
    from schemas.events import DeadLettered

    gw = make_gateway(engine, namespace=namespace, drain=True)
    sink = EventProducer(settings.kafka, registry, namespace=namespace)
    broken = issued(Task("broken", "parity-test", {}), "g-broken", 2).model_copy(update={"spec_json": "[1, 2]"})
    good = issued(Task("good", "parity-test", {"q": "hi"}), "g-good", 2)
    for e in (broken, good):
        sink.send(e, key=e.key)
    sink.flush(30)
    consumer = EventConsumer(settings.kafka, registry, f"{namespace}envs-worker", namespace=namespace,
                             on_decode_error=OnDecodeError.DEAD_LETTER, dead_letters=sink, stage="envs-worker")
    consumer.subscribe(["TaskIssued"])
    with ServerThread(gw) as server:
        async def run() -> int:
            async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                         headers={"Authorization": f"Bearer {KEYS['acme']}"}) as client:
                runner = Runner(client, sink, EnvSettings(max_steps=2, max_tokens=4))
                return await work(runner, consumer, sink, asyncio.Event(), groups_in_flight=2, max_tasks=2)

        assert asyncio.run(run()) == 2
    consumer.close()
    out = Collector(settings, registry, namespace, "DeadLettered", "EpisodeEnded")
    wait_for(lambda: len(out.events(EpisodeEnded)) >= 2 and out.events(DeadLettered), 60, what="episodes and a dead letter")
    [dead] = out.events(DeadLettered)
    assert dead.stage == "envs-worker" and "must be a JSON object" in dead.error
    assert {e.group_id for e in out.events(EpisodeEnded)} == {"g-good"}
    out.close()
