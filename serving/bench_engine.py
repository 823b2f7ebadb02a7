"""`nextstate bench engine`: decode throughput of the configured engine at several
concurrency levels (aggregate generated tokens per second, per-request latency, time to the
first token). Prompts are chat-templated questions that invite long answers; tokens are
counted as the engine returned them (a request may stop early at EOS)."""

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


async def run_engine_bench(engine: Any, tokenizer: Any, levels: list[int], max_new_tokens: int,
                           console: Any) -> list[dict[str, float]]:
    prompts = []
    for q in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    await _one(engine, prompts[0], SamplingParams(max_new_tokens=4))  # warm up
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
        console.print(f"concurrency {c:3}: {tokens:5} tokens in {wall:6.2f}s = {row['tok_s']:7.1f} tok/s aggregate "
                      f"({row['tok_s'] / c:6.1f} per request) | latency p50 {row['latency_p50_s']:.2f}s | "
                      f"first token p50 {row['ttft_p50_s'] * 1000:.0f} ms")
    return rows
