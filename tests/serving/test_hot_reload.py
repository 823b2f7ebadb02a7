"""Hot reload on the real stack: 8 concurrent generate loops on the local engine while
checkpoints are published by hand (real upload to MinIO, real CheckpointPublished on Kafka).
Zero failed requests; every request started after a swap reports the new version; requests
in flight finish; a checkpoint with a bad sha256 is dead-lettered and changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from infra.settings import ServingSettings
from tests.conftest import wait_for
from tests.serving.helpers import Load, full_variant, lora_adapter, publish_checkpoint, until

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.asyncio]


async def test_hot_reload_full_then_lora_under_load(settings, namespace, bucket, tiny_model_dir,
                                                    tmp_path: Path) -> None:
    from infra.kafka import EventConsumer
    from schemas.serde import registry_client
    from serving.local import LocalEngine
    from serving.reloader import build_reloader

    serving = ServingSettings(max_batch_size=8, cache_dir=tmp_path / "cache")
    s = settings.model_copy(update={"serving": serving})
    engine = LocalEngine(serving, model_dir=tiny_model_dir)
    reloader = build_reloader(engine, s, namespace=namespace)
    stop = asyncio.Event()
    follower = asyncio.create_task(reloader.run_forever(stop))
    prompts = [engine.tokenizer.encode(t) for t in ("hot", "reload me", "under load now")]
    load = Load(engine, prompts)
    load.start()
    try:
        await until(lambda: len(load.outcomes) >= 16, what="load to get going")
        publish_checkpoint(s, namespace, bucket, full_variant(tiny_model_dir, tmp_path / "full", 1), 1, "FULL")
        await until(lambda: engine.info().policy_version == 1, timeout=60, what="FULL v1 to be served")
        n = len(load.outcomes)
        await until(lambda: len(load.outcomes) >= n + 16, what="requests on v1")

        publish_checkpoint(s, namespace, bucket, lora_adapter(tiny_model_dir, tmp_path / "lora", 2), 2, "LORA")
        await until(lambda: engine.info().policy_version == 2, timeout=60, what="LORA v2 to be served")
        n = len(load.outcomes)
        await until(lambda: len(load.outcomes) >= n + 16, what="requests on v2")

        # A lying checksum: refused, dead-lettered, v2 keeps serving, and the reloader lives on.
        publish_checkpoint(s, namespace, bucket, lora_adapter(tiny_model_dir, tmp_path / "bad", 3), 3,
                           "LORA", corrupt=True)
        await until(lambda: any(not w.ok for w in reloader.swaps), timeout=60, what="v3 to be refused")
        assert engine.info().policy_version == 2
        assert "sha256" in next(w for w in reloader.swaps if not w.ok).error

        v4 = lora_adapter(tiny_model_dir, tmp_path / "ok", 4)
        publish_checkpoint(s, namespace, bucket, v4, 4, "LORA")
        await until(lambda: engine.info().policy_version == 4, timeout=60, what="v4 after the bad one")
        n = len(load.outcomes)
        await until(lambda: len(load.outcomes) >= n + 8, what="requests on v4")

        # v5 has v4's very files (a learner whose steps since v4 all lacked a signal): served
        # under the new number, nothing downloaded or loaded
        publish_checkpoint(s, namespace, bucket, v4, 5, "LORA")
        await until(lambda: engine.info().policy_version == 5, timeout=60, what="v5 relabelled")
        n = len(load.outcomes)
        await until(lambda: len(load.outcomes) >= n + 8, what="requests on v5")
    finally:
        outcomes = await load.finish()
        stop.set()
        await follower
        reloader.close()
        await engine.close()

    failures = [o for o in outcomes if o.error]
    assert not failures, f"{len(failures)} failed requests, first: {failures[0].error}"
    swaps = {w.version: w for w in reloader.swaps if w.ok}
    assert sorted(swaps) == [1, 2, 4, 5]
    assert [w.version for w in swaps.values() if w.relabelled] == [5]
    assert (engine.info().details["swaps"], engine.info().details["relabels"]) == (3, 1)
    for version, swap in swaps.items():
        after = [o for o in outcomes if o.started > swap.at]
        assert after and all(o.version >= version for o in after), f"a request after v{version} got older weights"
        before = [o for o in outcomes if o.ended < swap.at]
        assert all(o.version < version for o in before)
    # requests in flight across a swap finished on the weights they started with
    straddling = [o for o in outcomes if o.started < swaps[1].at < o.ended]
    assert all(o.version in (0, 1) for o in straddling)
    assert {o.version for o in outcomes} >= {0, 1, 2, 4, 5}
    # only weights/ was fetched, never the optimizer state
    cached = list((tmp_path / "cache" / "checkpoints").rglob("*"))
    assert cached and not [p for p in cached if "train_state" in p.parts]

    consumer = EventConsumer(s.kafka, registry_client(s.registry), "t-dead-letters", namespace=namespace)
    consumer.subscribe(["DeadLettered"])
    try:
        seen = []

        def dead_lettered() -> bool:
            record = consumer.poll(0.5)
            if record is not None:
                seen.append(record.event)
            return any(e.stage == "serving-reloader" and "v3" in e.error for e in seen)

        await asyncio.to_thread(wait_for, dead_lettered, 30, 0.05, "the bad checkpoint on dead-letters")
    finally:
        consumer.close()
