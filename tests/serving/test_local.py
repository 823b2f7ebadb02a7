"""The local engine on the tiny model: token-exact against a plain no-cache forward, batching
that changes nothing a sequence computes, sampling controls, streaming, scoring, limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from infra.errors import ContextLengthError, ServingError
from infra.settings import ServingSettings
from schemas.events import SamplingParams
from serving.engine import Engine, Generation, TokenDelta
from tests.serving.helpers import until

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(max_batch_size=8), model_dir=tiny_model_dir)
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def greedy_reference(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by full forward passes without any cache: the ground truth."""
    ids, lps = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            lp = torch.log_softmax(logits.float(), -1)
            tok = int(torch.argmax(logits))
            ids.append(tok)
            lps.append(float(lp[tok]))
    return ids[len(prompt):], lps


def prompt_of(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


async def test_is_an_engine(engine) -> None:
    assert isinstance(engine, Engine)
    info = engine.info()
    assert info.max_context == 2048 and info.policy_version == 0
    assert Path(info.details["tokenizer"]).is_dir()


async def test_greedy_matches_no_cache_reference(engine, reference) -> None:
    prompt = prompt_of(engine, "hello there")
    gen = await engine.generate(prompt, GREEDY)
    ids, lps = greedy_reference(reference, prompt, len(gen.token_ids))
    assert gen.token_ids == ids
    assert gen.logprobs == pytest.approx(lps, abs=1e-4)
    assert gen.prompt_tokens == len(prompt) and gen.policy_version == 0


async def test_concurrent_requests_share_steps_and_change_nothing(engine, reference) -> None:
    # Prompts of different lengths join a running batch at different steps and leave it at
    # different steps (different max_new_tokens): each must equal its solo reference.
    texts = ["a", "a longer prompt here", "mid size", "x" * 40, "yo", "batching!", "q", "zz top"]
    prompts = [prompt_of(engine, t) for t in texts]
    steps_before = engine.info().details["steps"]
    gens = await asyncio.gather(*[
        engine.generate(p, SamplingParams(temperature=0.0, max_new_tokens=6 + 3 * i))
        for i, p in enumerate(prompts)])
    steps = engine.info().details["steps"] - steps_before
    for i, (p, g) in enumerate(zip(prompts, gens, strict=True)):
        ids, lps = greedy_reference(reference, p, 6 + 3 * i)
        assert g.token_ids == ids, f"sequence {i} diverged in the batch"
        assert g.logprobs == pytest.approx(lps, abs=1e-4)
    total = sum(len(g.token_ids) for g in gens)
    assert steps < total / 2, f"{total} tokens took {steps} decode steps: not batched"


async def test_seeded_sampling_is_reproducible_in_any_company(engine) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=1234)
    prompt = prompt_of(engine, "sample me")
    alone = await engine.generate(prompt, params)
    crowd = await asyncio.gather(
        engine.generate(prompt, params),
        *[engine.generate(prompt_of(engine, f"other {i}"), SamplingParams(max_new_tokens=8))
          for i in range(4)])
    assert crowd[0].token_ids == alone.token_ids
    other_seed = await engine.generate(prompt, params.model_copy(update={"seed": 99}))
    assert other_seed.token_ids != alone.token_ids


async def test_logprobs_are_raw_model_logprobs(engine) -> None:
    # At temperature 2 the sampling distribution differs from the model's; the engine still
    # reports the raw temperature-1 logprob, which is exactly what score() computes.
    prompt = prompt_of(engine, "raw logprobs")
    gen = await engine.generate(prompt, SamplingParams(temperature=2.0, max_new_tokens=8, seed=7))
    scores = await engine.score(prompt, gen.token_ids)
    assert gen.logprobs == pytest.approx(scores.logprobs, abs=1e-4)


async def test_stream_yields_each_token_then_finishes(engine) -> None:
    prompt = prompt_of(engine, "stream")
    deltas = [d async for d in engine.stream(prompt, GREEDY)]
    assert all(isinstance(d, TokenDelta) for d in deltas)
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "length" and len(deltas) == GREEDY.max_new_tokens
    gen = await engine.generate(prompt, GREEDY)
    assert [d.token_id for d in deltas] == gen.token_ids


async def test_abandoned_stream_frees_its_slot(engine) -> None:
    prompt = prompt_of(engine, "abandon")
    stream = engine.stream(prompt, SamplingParams(max_new_tokens=1000))
    first = await anext(stream)
    await stream.aclose()
    assert first.finish_reason is None
    await until(lambda: engine.info().details["running"] == 0, what="the slot to be freed")


async def test_stop_string_ends_generation_with_stop(engine, reference) -> None:
    prompt = prompt_of(engine, "stop here")
    free = await engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=20))
    text = engine.tokenizer.decode(free.token_ids)
    stop = text[5:7]
    gen = await engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=20, stop=[stop]))
    assert gen.finish_reason == "stop"
    assert stop in engine.tokenizer.decode(gen.token_ids)
    assert stop not in engine.tokenizer.decode(gen.token_ids[:-1])
    assert gen.token_ids == free.token_ids[:len(gen.token_ids)]


async def test_eos_is_returned_and_stops(engine) -> None:
    # Force EOS by scoring: find a prompt whose greedy continuation hits EOS is luck on a random
    # model, so check the rule directly on the emitted tokens of a long run instead.
    gen = await engine.generate(prompt_of(engine, "eos?"), SamplingParams(temperature=1.5, max_new_tokens=64, seed=3))
    eos = engine.tokenizer.eos_token_id
    assert eos not in gen.token_ids[:-1]
    assert (gen.finish_reason == "stop") == (gen.token_ids[-1] == eos)


async def test_context_overflow_is_a_clear_error(engine) -> None:
    prompt = [5] * 2000
    with pytest.raises(ContextLengthError, match="2000 tokens.*2048"):
        await engine.generate(prompt, SamplingParams(max_new_tokens=100))
    with pytest.raises(ContextLengthError):
        await engine.score(prompt, [5] * 100)
    with pytest.raises(ServingError):
        await engine.generate([], GREEDY)


async def test_score_with_top_k(engine, reference) -> None:
    prompt, cont = prompt_of(engine, "score this"), prompt_of(engine, " continuation")
    scores = await engine.score(prompt, cont, top_k=3)
    with torch.inference_mode():
        logits = reference(input_ids=torch.tensor([prompt + cont])).logits[0]
    lp = torch.log_softmax(logits.float(), -1)[len(prompt) - 1:-1]
    expected = lp.gather(1, torch.tensor(cont)[:, None])[:, 0].tolist()
    assert scores.logprobs == pytest.approx(expected, abs=1e-4)
    assert len(scores.top_ids) == len(cont) and all(len(r) == 3 for r in scores.top_ids)
    assert scores.top_ids[0][0] == int(torch.argmax(lp[0]))
    assert scores.top_logprobs[0] == sorted(scores.top_logprobs[0], reverse=True)
    base = await engine.score(prompt, cont, base=True)
    assert base.logprobs == pytest.approx(scores.logprobs)  # no swap yet: base is current


async def test_generation_type(engine) -> None:
    gen = await engine.generate(prompt_of(engine, "t"), SamplingParams(temperature=0.0, max_new_tokens=3))
    assert isinstance(gen, Generation) and len(gen.logprobs) == len(gen.token_ids) == 3


async def test_chunked_prefill_is_exact_and_interleaves_with_decoding(tiny_model_dir, reference) -> None:
    from serving.local import LocalEngine

    # no prefix cache: the long prompt is sent twice and must be prefilled chunk by chunk both times
    eng = LocalEngine(ServingSettings(prefill_chunk=8, prefix_cache_mb=0), model_dir=tiny_model_dir)
    try:
        long_prompt = prompt_of(eng, "a prompt long enough to need many chunks " * 10)
        gen = await eng.generate(long_prompt, GREEDY)
        ids, lps = greedy_reference(reference, long_prompt, GREEDY.max_new_tokens)
        assert gen.token_ids == ids and gen.logprobs == pytest.approx(lps, abs=1e-4)
        # scoring is chunked the same way: continuation logprobs spread over several chunks
        cont = prompt_of(eng, " and a continuation that also spans chunks")
        scores = await eng.score(long_prompt[:13], cont, top_k=3)
        with torch.inference_mode():
            lp = torch.log_softmax(reference(input_ids=torch.tensor([long_prompt[:13] + cont])).logits[0], -1)
        lp = lp[12:-1]
        assert scores.logprobs == pytest.approx(lp.gather(1, torch.tensor(cont)[:, None])[:, 0].tolist(), abs=1e-4)
        assert scores.top_ids == torch.topk(lp, 3).indices.tolist()

        arrivals: list[str] = []

        async def consume(label: str, prompt: list[int], n: int) -> None:
            async for _ in eng.stream(prompt, SamplingParams(temperature=0.0, max_new_tokens=n)):
                arrivals.append(label)

        running = asyncio.create_task(consume("short", prompt_of(eng, "hi"), 200))
        await until(lambda: arrivals, what="the short request to start")
        await consume("long", long_prompt, 1)
        await running
        before = arrivals.index("long")
        chunks = -(-len(long_prompt) // 8)
        assert before >= chunks // 2, f"only {before} tokens decoded during a {chunks}-chunk prefill"
    finally:
        await eng.close()
