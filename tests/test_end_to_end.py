"""The whole loop, end to end, as `nextstate demo` runs it, on a tiny model: simulated users
talk to the gateway (a real process), the faust processors turn their turns and feedback
into samples, two learner runs train and publish checkpoints to MinIO, the gateway
hot-swaps the served run's checkpoint, and the audit trail walks from a sample to the
checkpoint that trained on it. Efficacy is the demo's business, not this test's: a random
tiny model has nothing to learn in a few steps."""

from __future__ import annotations

import pytest
from rich.console import Console

from infra.cli.audit import lineage, resolve
from infra.cli.demo import DemoConfig, run_demo
from infra.eventlog import read_log
from infra.provision import admin_client
from schemas.events import (
    CheckpointPublished,
    RewardJudged,
    SampleReady,
    TransitionFormed,
    TurnRecorded,
    TurnType,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_the_loop_closes(settings, stack, tiny_model_dir, tmp_path):
    cfg = DemoConfig(model=str(tiny_model_dir), sessions=8, concurrency=4, round_sessions=4, max_tokens=12,
                     methods=("combined", "rl"), lr=1e-3, checkpoint_every_steps=1, port=30187,
                     out_dir=tmp_path, settle_timeout_s=180)
    console = Console(record=True, width=160)
    state = run_demo(settings, cfg, console)

    assert state.failure is None, state.failure
    assert len(state.results) == 8
    assert state.probes[0].policy_version == 0
    assert state.probes[-1].policy_version >= 1, "the gateway never swapped in a checkpoint"
    # Two rounds of four: the second round talked to a policy trained on the first.
    assert 4 in state.probed_after
    assert all(r.first.policy_version >= 1 for r in state.results[4:])
    assert {m: p.policy_version >= 1 for m, p in state.final.items()} == {"combined": True, "rl": True}
    [out] = list(tmp_path.iterdir())
    assert (out / "satisfaction.png").stat().st_size > 5_000
    text = console.export_text()
    assert "first-response satisfaction on held-out probes" in text and "each method" in text

    ns = out.name + "."
    log = read_log(settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"namespace": ns})}))
    events = [i.event for i in log]
    main = [e for e in events if isinstance(e, TurnRecorded) and e.turn_type is TurnType.MAIN]
    side = [e for e in events if isinstance(e, TurnRecorded) and e.turn_type is TurnType.SIDE]
    assert len(main) == 16 and side  # two main turns per session; probes are side turns
    transitions = [e for e in events if isinstance(e, TransitionFormed)]
    assert len({t.turn.event_id for t in transitions}) == 16
    assert all(t.turn.turn_type is TurnType.MAIN for t in transitions)
    judged = [e for e in events if isinstance(e, RewardJudged)]
    assert judged and {j.judge for j in judged} == {"feedback"}
    samples = [i for i in log if isinstance(i.event, SampleReady)]
    assert samples
    runs = {e.run for e in events if isinstance(e, CheckpointPublished)}
    assert runs == {"demo-combined", "demo-rl"}

    lin = lineage(log, resolve(log, samples[0].event.event_id)[0])
    assert lin.turn is not None and lin.transition is not None and lin.judgements
    assert {c.run for c in lin.checkpoints} == {"demo-combined", "demo-rl"}

    admin = admin_client(settings.kafka)
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(ns)]
    for fut in admin.delete_topics(names, operation_timeout=30).values():
        fut.result()
