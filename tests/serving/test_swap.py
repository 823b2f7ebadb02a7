"""Weight swaps on the local engine, without Kafka: requests in flight finish on the weights
they started on (token-exact against a reference of those weights), later ones get the new
version, nothing fails; FULL and LoRA, and base scoring through both."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from infra.settings import ServingSettings
from schemas.events import SamplingParams
from serving.engine import WeightsKind
from tests.serving.helpers import full_variant, lora_adapter, reference_model, until
from tests.serving.test_local import greedy_reference

pytestmark = pytest.mark.asyncio

LONG = SamplingParams(temperature=0.0, max_new_tokens=40)


@pytest.fixture
def engine(tiny_model_dir: Path):
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(max_batch_size=8), model_dir=tiny_model_dir)
    yield eng
    asyncio.run(eng.close())


async def started(engine, prompt: list[int]):
    """A stream already decoding on the current weights (its first token received)."""
    stream = engine.stream(prompt, LONG)
    first = await anext(stream)
    return first, stream


async def finish(first, stream) -> tuple[list[int], set[int]]:
    deltas = [first] + [d async for d in stream]
    return [d.token_id for d in deltas], {d.policy_version for d in deltas}


async def test_full_and_lora_swaps_pin_in_flight_requests(engine, tiny_model_dir, tmp_path) -> None:
    prompt = engine.tokenizer.encode("swap me")
    full_dir = full_variant(tiny_model_dir, tmp_path / "full", seed=1)
    lora_dir = lora_adapter(tiny_model_dir, tmp_path / "lora", seed=2)
    lora2_dir = lora_adapter(tiny_model_dir, tmp_path / "lora2", seed=3)
    expect = {name: greedy_reference(ref, prompt, LONG.max_new_tokens)[0] for name, ref in {
        "base": reference_model(tiny_model_dir), "full": reference_model(full_dir),
        "lora": reference_model(tiny_model_dir, lora_dir),
        "lora2": reference_model(tiny_model_dir, lora2_dir)}.items()}
    assert len({tuple(v) for v in expect.values()}) == 4, "the variants must sample differently"

    # v0 (base) in flight while LoRA v1 lands; then v1 in flight while LoRA v2 lands; then v2
    # in flight while FULL v3 lands.
    steps = [("lora", lora_dir, WeightsKind.LORA, 1), ("lora2", lora2_dir, WeightsKind.LORA, 2),
             ("full", full_dir, WeightsKind.FULL, 3)]
    old_name = "base"
    for name, path, kind, version in steps:
        in_flight = [await started(engine, prompt) for _ in range(3)]
        await engine.load_weights(str(path), kind, version)
        after = await engine.generate(prompt, LONG)
        for first, stream in in_flight:
            ids, versions = await finish(first, stream)
            assert versions == {version - 1}
            assert ids == expect[old_name], f"in-flight request changed weights at v{version}"
        assert after.policy_version == version and engine.info().policy_version == version
        assert after.token_ids == expect[name]
        old_name = name

    # Superseded adapters are gone once their last request ended; base scoring still works.
    await until(lambda: engine.info().details["running"] == 0, what="batches to drain")
    await until(lambda: engine._base.adapters == [], what="superseded adapters to be deleted")
    assert engine.info().details["weights"] == "full"
    cont = expect["base"][:10]
    base_scores = await engine.score(prompt, cont, base=True)
    assert base_scores.policy_version == 0
    assert base_scores.logprobs == pytest.approx(
        greedy_reference(reference_model(tiny_model_dir), prompt, 10)[1], abs=1e-4)


async def test_lora_base_scoring_disables_the_adapter(engine, tiny_model_dir, tmp_path) -> None:
    prompt = engine.tokenizer.encode("teacher")
    before = await engine.score(prompt, prompt)
    await engine.load_weights(str(lora_adapter(tiny_model_dir, tmp_path / "a", seed=5)), WeightsKind.LORA, 7)
    current = await engine.score(prompt, prompt)
    base = await engine.score(prompt, prompt, base=True)
    assert current.policy_version == 7 and base.policy_version == 0
    assert base.logprobs == pytest.approx(before.logprobs, abs=1e-5)
    assert current.logprobs != pytest.approx(before.logprobs, abs=1e-3)


async def test_bad_weights_are_refused_and_serving_goes_on(engine, tmp_path) -> None:
    from infra.errors import ServingError

    (tmp_path / "junk").mkdir()
    with pytest.raises(ServingError, match="no config.json"):
        await engine.load_weights(str(tmp_path / "junk"), WeightsKind.FULL, 1)
    with pytest.raises(ServingError, match="no adapter_config.json"):
        await engine.load_weights(str(tmp_path / "junk"), WeightsKind.LORA, 1)
    gen = await engine.generate(engine.tokenizer.encode("still here"), SamplingParams(max_new_tokens=4))
    assert gen.policy_version == 0 and len(gen.token_ids) >= 1


async def test_without_keep_base_the_base_is_dropped_after_a_full_swap(tiny_model_dir, tmp_path) -> None:
    from infra.errors import ServingError
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(keep_base=False), model_dir=tiny_model_dir)
    try:
        prompt = eng.tokenizer.encode("drop")
        variant = full_variant(tiny_model_dir, tmp_path / "f", 1)  # built first: it is slow
        first, stream = await started(eng, prompt)
        await eng.load_weights(str(variant), WeightsKind.FULL, 1)
        assert eng._base is not None, "a request still runs on the base weights"
        ids, versions = await finish(first, stream)
        assert versions == {0}
        await until(lambda: eng._base is None, what="the base weights to be dropped")
        with pytest.raises(ServingError, match="keep_base"):
            await eng.score(prompt, prompt, base=True)
        with pytest.raises(ServingError, match="KEEP_BASE"):
            await eng.load_weights(str(lora_adapter(tiny_model_dir, tmp_path / "l", 2)), WeightsKind.LORA, 2)
        assert (await eng.generate(prompt, LONG)).policy_version == 1
    finally:
        await eng.close()


async def test_a_dropped_base_model_held_in_a_frozen_cycle_is_still_collected(tiny_model_dir, tmp_path) -> None:
    """`nextstate serve` freezes its start-up heap (infra.heap); a base model caught in a
    reference cycle would then outlive its drop. The engine lets one collection see it."""
    import gc
    import weakref

    from infra import heap
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(keep_base=False), model_dir=tiny_model_dir)
    try:
        variant = full_variant(tiny_model_dir, tmp_path / "f", 1)
        base = weakref.ref(eng._base.model)
        object.__setattr__(eng._base.model.model, "back", eng._base.model)   # child -> parent -> child
        heap.freeze()
        await eng.load_weights(str(variant), WeightsKind.FULL, 1)
        await until(lambda: eng._base is None, what="the base weights to be dropped")
        await until(lambda: base() is None, what="the dropped base model to be collected")
        assert (await eng.generate(eng.tokenizer.encode("still"), LONG)).policy_version == 1
    finally:
        gc.unfreeze()
        await eng.close()
