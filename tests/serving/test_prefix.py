"""The prefix cache: pure bookkeeping (longest match, extension replaces, memory bound, policy
identity), then the local engine on the tiny model: a prompt that shares a prefix with an
earlier one prefills only the rest and computes exactly what a no-cache forward computes; a
score reuses only what precedes its continuation; a weight swap never reuses the old weights' KV."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from infra.settings import ServingSettings
from schemas.events import SamplingParams
from serving.engine import WeightsKind
from serving.prefix import PrefixCache, common_prefix
from tests.serving.helpers import full_variant, lora_adapter, reference_model
from tests.serving.test_local import greedy_reference


def kv_of(tokens: list[int], layers: int = 2) -> DynamicCache:
    """A fake cache whose every key/value entry is its token id: what a crop keeps is visible."""
    cache = DynamicCache()
    t = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None].expand(1, 2, len(tokens), 4)
    for i in range(layers):
        cache.update(t.clone(), -t.clone(), i)
    return cache


def test_common_prefix():
    a = torch.tensor([1, 2, 3, 4])
    assert common_prefix(a, torch.tensor([1, 2, 9])) == 2
    assert common_prefix(a, torch.tensor([1, 2])) == 2
    assert common_prefix(a, torch.tensor([7])) == 0
    assert common_prefix(a, torch.tensor([], dtype=torch.long)) == 0


def test_longest_match_on_the_same_policy_only():
    pc = PrefixCache(capacity_bytes=1 << 20, min_tokens=2)
    p1, p2 = object(), object()
    assert pc.store(p1, [1, 2, 3, 4, 5], kv_of([1, 2, 3, 4, 5]))
    assert pc.store(p1, [1, 2, 8, 9], kv_of([1, 2, 8, 9]))
    cache, n = pc.lookup(p1, [1, 2, 3, 4, 7, 7], limit=5)
    assert n == 4 and cache.get_seq_length() == 4
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [1, 2, 3, 4]
    assert cache.layers[1].values[0, 0, :, 0].tolist() == [-1, -2, -3, -4]
    assert pc.lookup(p1, [1, 2, 3, 4, 5, 6], limit=3)[1] == 3       # never past the limit
    assert pc.lookup(p2, [1, 2, 3, 4, 5, 6], limit=5) == (None, 0)  # other weights: nothing
    assert pc.lookup(p1, [1, 9], limit=2) == (None, 0)              # shorter than min_tokens
    cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), 0)   # the caller grows its copy
    assert pc.lookup(p1, [1, 2, 3, 4, 5, 6], limit=5)[0].layers[0].keys[0, 0, :, 0].tolist() == [1, 2, 3, 4, 5]


def test_an_extending_prompt_replaces_its_entry_and_memory_is_bounded():
    one = kv_of([1] * 10)
    per_entry = sum(layer.keys.numel() * 4 * 2 for layer in one.layers)
    pc = PrefixCache(capacity_bytes=int(per_entry * 2.5), min_tokens=2)
    p = object()
    assert pc.store(p, [1, 2, 3], kv_of([1, 2, 3]))
    assert pc.store(p, [1, 2, 3, 4], kv_of([1, 2, 3, 4]))   # a conversation's next turn
    assert len(pc.entries) == 1 and pc.entries[0].tokens.tolist() == [1, 2, 3, 4]
    assert not pc.store(p, [1, 2, 3], kv_of([1, 2, 3]))     # already held
    for first in (5, 6, 7):
        pc.store(p, [first] * 10, kv_of([first] * 10))
    assert pc.nbytes <= pc.capacity_bytes
    assert [e.tokens[0].item() for e in pc.entries] == [6, 7]   # least recently used went first
    assert pc.stats["evicted"] == 2
    pc.keep_only([])
    assert pc.entries == []


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(max_batch_size=4, prefill_chunk=64, prefix_cache_min_tokens=16),
                      model_dir=tiny_model_dir)
    yield eng
    asyncio.run(eng.close())


def long_prompt(engine, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, len(engine.tokenizer) - 10, (n,), generator=g).tolist()


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


@pytest.mark.asyncio
async def test_a_shared_prefix_is_prefilled_once_and_changes_nothing(engine, tiny_model_dir):
    reference = reference_model(tiny_model_dir)
    system = long_prompt(engine, 300, seed=1)
    first = system + long_prompt(engine, 20, seed=2)
    second = system + long_prompt(engine, 30, seed=3)
    before = dict(engine.info().details["prefix_cache"])
    g1 = await engine.generate(first, GREEDY)
    g2 = await engine.generate(second, GREEDY)
    after = engine.info().details["prefix_cache"]
    assert after["hits"] - before["hits"] >= 1
    assert after["reused_tokens"] - before["reused_tokens"] >= 300
    for prompt, gen in ((first, g1), (second, g2)):
        ids, lps = greedy_reference(reference, prompt, len(gen.token_ids))
        assert gen.token_ids == ids
        assert gen.logprobs == pytest.approx(lps, abs=1e-4)
    # the very same prompt again: all but its last token come from the cache
    again = dict(engine.info().details["prefix_cache"])
    g3 = await engine.generate(second, GREEDY)
    assert g3.token_ids == g2.token_ids
    assert engine.info().details["prefix_cache"]["reused_tokens"] - again["reused_tokens"] == len(second) - 1


@pytest.mark.asyncio
async def test_a_score_reuses_only_what_precedes_its_continuation(engine, tiny_model_dir):
    from serving.local import LocalEngine

    prompt = long_prompt(engine, 200, seed=4)
    await engine.generate(prompt + long_prompt(engine, 40, seed=5), GREEDY)   # caches 240 tokens
    continuation = long_prompt(engine, 12, seed=6)
    before = engine.info().details["prefix_cache"]["reused_tokens"]
    cached = await engine.score(prompt, continuation, top_k=3)
    assert engine.info().details["prefix_cache"]["reused_tokens"] - before == len(prompt) - 1
    plain = LocalEngine(ServingSettings(prefix_cache_mb=0), model_dir=tiny_model_dir)
    try:
        expected = await plain.score(prompt, continuation, top_k=3)
    finally:
        await plain.close()
    assert cached.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert cached.top_ids == expected.top_ids


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [WeightsKind.FULL, WeightsKind.LORA])
async def test_a_new_version_never_reuses_the_old_versions_cache(tiny_model_dir, tmp_path, kind):
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(prefix_cache_min_tokens=16), model_dir=tiny_model_dir)
    try:
        prompt = long_prompt(eng, 200, seed=7)
        await eng.generate(prompt, GREEDY)
        assert eng.info().details["prefix_cache"]["entries"] == 1
        if kind is WeightsKind.FULL:
            path = full_variant(tiny_model_dir, tmp_path / "v1", seed=3)
            reference = reference_model(path)
        else:
            path = lora_adapter(tiny_model_dir, tmp_path / "v1", seed=3)
            reference = reference_model(tiny_model_dir, path)
        await eng.load_weights(str(path), kind, 1)
        hits = eng.info().details["prefix_cache"]["hits"]
        gen = await eng.generate(prompt + [11, 12], GREEDY)
        assert gen.policy_version == 1
        assert eng.info().details["prefix_cache"]["hits"] == hits    # the old KV was not used
        ids, lps = greedy_reference(reference, prompt + [11, 12], len(gen.token_ids))
        assert gen.token_ids == ids
        assert gen.logprobs == pytest.approx(lps, abs=1e-4)
        # and the new version's own prompts are cached and reused again
        await eng.generate(prompt + [11, 12, 13], GREEDY)
        assert eng.info().details["prefix_cache"]["hits"] == hits + 1
    finally:
        await eng.close()


@pytest.mark.asyncio
async def test_a_relabelled_version_keeps_the_cache_and_samples_the_same(tiny_model_dir, tmp_path):
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(prefix_cache_min_tokens=16), model_dir=tiny_model_dir)
    try:
        assert not await eng.relabel(1)   # the start-up weights keep their number
        await eng.load_weights(str(lora_adapter(tiny_model_dir, tmp_path / "v1", seed=3)), WeightsKind.LORA, 1)
        prompt = long_prompt(eng, 200, seed=8)
        first = await eng.generate(prompt, GREEDY)
        hits = eng.info().details["prefix_cache"]["hits"]
        assert await eng.relabel(2)
        assert not await eng.relabel(2)   # only ever forwards
        again = await eng.generate(prompt, GREEDY)
        details = eng.info().details
        assert (first.policy_version, again.policy_version) == (1, 2)
        assert again.token_ids == first.token_ids
        assert again.logprobs == pytest.approx(first.logprobs, abs=1e-5)
        assert details["prefix_cache"]["hits"] == hits + 1   # v1's KV serves v2: the same weights
        assert (details["swaps"], details["relabels"]) == (1, 1)
    finally:
        await eng.close()
