"""`nextstate bench engine`: decode throughput of the configured engine at several
concurrency levels (aggregate generated tokens per second, per-request latency, time to the
first token). Prompts are chat-templated questions that invite long answers; tokens are
counted as the engine returned them (a request may stop early at EOS).

Also: how far concurrency 1 is from the memory-bandwidth floor (every weight read once per
token: weight bytes / copy bandwidth measured on the device), and the prefix cache: time to
the first token of a prompt whose long system prompt the engine has not seen, then of prompts
that share it with different questions."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from schemas.events import SamplingParams

QUESTIONS = ["Write a long story about a lighthouse keeper.", "Explain how a compiler works, step by step.",
             "Describe the water cycle in detail.", "List many ideas for a weekend trip and explain each.",
             "Write a detailed recipe for bread.", "Explain the rules of chess at length.",
             "Tell the history of the bicycle.", "Describe how to learn a new language."]


async def _one(engine: Any, prompt: list[int], params: SamplingParams) -> tuple[int, float, float]:
    t0 = time.perf_counter()
    first, n = None, 0
    async for _ in engine.stream(prompt, params):
        n += 1
        if first is None:
            first = time.perf_counter() - t0
    return n, time.perf_counter() - t0, first or 0.0


def copy_bandwidth(device: Any, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second moved by a device-to-device copy (read + write), best of `repeats`."""
    import torch

    src = torch.empty(mib << 18, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes(engine: Any) -> int | None:
    weights = getattr(getattr(engine, "_current", None), "weights", None)
    model = getattr(weights, "model", None)
    if model is None:
        return None
    return sum(p.numel() * p.element_size() for p in model.parameters())


async def run_prefix_bench(engine: Any, tokenizer: Any, prefix_tokens: int, console: Any,
                           questions: int = 3) -> dict[str, float]:
    """Time to first token: a prompt with a never-seen ~`prefix_tokens`-token system prompt,
    then `questions` prompts with the same system prompt and other questions."""
    nonce = f"{time.time_ns()}"   # no earlier run's entry can match
    words = ("You are a careful assistant working in a shell. Read files before editing them; "
             "run the tests after each change; keep answers short. Rule {}: never guess a path. ")
    text, i = f"Session {nonce}. ", 0
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < prefix_tokens:
        text += words.format(i) * 8
        i += 8

    def prompt(q: str) -> list[int]:
        ids = tokenizer.apply_chat_template([{"role": "system", "content": text}, {"role": "user", "content": q}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    one = SamplingParams(temperature=0.0, max_new_tokens=1)
    cold_prompt = prompt(QUESTIONS[0])
    _, _, cold = await _one(engine, cold_prompt, one)
    warm = sorted([(await _one(engine, prompt(q), one))[2] for q in QUESTIONS[1:1 + questions]])
    mid = warm[len(warm) // 2]
    console.print(f"prefix cache: {len(cold_prompt)}-token prompt, first token cold {cold * 1000:.0f} ms; "
                  f"same system prompt, other questions: {', '.join(f'{w * 1000:.0f}' for w in warm)} ms "
                  f"(median {mid / cold:.1%} of cold)")
    return {"prompt_tokens": len(cold_prompt), "ttft_cold_s": cold, "ttft_warm_s": mid, "warm_over_cold": mid / cold}


async def run_engine_bench(engine: Any, tokenizer: Any, levels: list[int], max_new_tokens: int,
                           console: Any) -> list[dict[str, float]]:
    prompts = []
    for q in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    await _one(engine, prompts[0], SamplingParams(max_new_tokens=4))  # warm up
    bandwidth_floor_s = None
    n_bytes, device = weight_bytes(engine), getattr(engine, "device", None)
    if n_bytes and device is not None:
        bandwidth_floor_s = n_bytes / copy_bandwidth(device)
    rows = []
    for c in levels:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[
            _one(engine, prompts[i % len(prompts)], SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=i))
            for i in range(c)])
        wall = time.perf_counter() - t0
        tokens = sum(r[0] for r in results)
        lat = sorted(r[1] for r in results)
        ttft = sorted(r[2] for r in results)
        row = {"concurrency": c, "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
               "latency_p50_s": lat[len(lat) // 2], "ttft_p50_s": ttft[len(ttft) // 2]}
        rows.append(row)
        if c == 1 and bandwidth_floor_s:
            per_token = wall / max(tokens, 1)
            console.print(f"concurrency 1: {per_token * 1000:.2f} ms per token, {per_token / bandwidth_floor_s:.1f}× "
                          f"the memory-bandwidth floor ({bandwidth_floor_s * 1000:.3f} ms)")
        console.print(f"concurrency {c:3}: {tokens:5} tokens in {wall:6.2f}s = {row['tok_s']:7.1f} tok/s aggregate "
                      f"({row['tok_s'] / c:6.1f} per request) | latency p50 {row['latency_p50_s']:.2f}s | "
                      f"first token p50 {row['ttft_p50_s'] * 1000:.0f} ms")
    return rows
