"""The policy's own greedy answers, checked for loops before a step (sequence-level unlikelihood).

Why: a personal agent's users are served sampled answers, which hardly ever loop, so no user
rejects a loop and no reward reaches one; yet after a few updates SmolLM2-135M's *greedy*
answers began to loop a sentence or a list item until the token limit (the first-token
distribution flattens, a greedy answer starts where it peaks, and the base model's own
repetition takes over). A client that asks for temperature 0 gets those answers.

What: before a step, the policy answers up to `prompts` of the step's contexts greedily. An
answer loops when one `ngram`-token sequence occurs in it `repeats` times or more (token ids,
so it reads any language or format the same way). In a looping answer, every token that
completes an `unlikely_ngram`-gram already seen earlier in the answer is a repeat; the step
then also minimises -log(1 - p) of those tokens (Welleck et al.'s unlikelihood, bounded: its
push fades as p falls), which moves the greedy path off the repetition rather than pushing
down everything the answer said. Answers that do not loop add nothing.

Greedy decoding of the same weights and contexts gives the same answers, so a step replayed
after a restart checks and penalises what it did the first time. Knows nothing about Kafka.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from infra.settings import LoopGuardSettings


def most_repeated(ids: Sequence[int], n: int) -> int:
    """How often the most frequent `n`-token sequence occurs in `ids` (0 when shorter than n)."""
    counts = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return max(counts.values(), default=0)


def loops(ids: Sequence[int], n: int, repeats: int) -> bool:
    """Whether one `n`-token sequence occurs `repeats` times or more in `ids`."""
    return most_repeated(ids, n) >= repeats


def repeated_positions(ids: Sequence[int], n: int) -> list[int]:
    """1 at each token that completes an `n`-gram already completed earlier in `ids`, else 0."""
    seen: set[tuple[int, ...]] = set()
    out = [0] * len(ids)
    for i in range(n - 1, len(ids)):
        gram = tuple(ids[i - n + 1:i + 1])
        if gram in seen:
            out[i] = 1
        seen.add(gram)
    return out


@dataclass
class LoopBatch:
    """The looping greedy answers of a step, right-padded after their contexts; `mask` is
    aligned to targets (position t belongs to token t+1) like learner.batching.Batch's."""

    input_ids: torch.Tensor        # [B, L] long
    attention_mask: torch.Tensor   # [B, L] long
    mask: torch.Tensor             # [B, L-1] float, 1 = a repeated token to push down


def contexts(batches: Sequence[Any], limit: int, max_tokens: int) -> list[list[int]]:
    """Up to `limit` distinct contexts of the step's samples, in order: each sample's tokens
    before its first trained one; one longer than `max_tokens` is skipped."""
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for batch in batches:
        for row in range(batch.input_ids.shape[0]):
            trained = batch.mask[row].nonzero()
            if not len(trained):
                continue
            n = int(trained[0]) + 1   # target position t is token t + 1: the context is 0..t
            if n > max_tokens:
                continue
            ids = tuple(int(t) for t in batch.input_ids[row, :n].tolist())
            if ids not in seen:
                seen.add(ids)
                out.append(list(ids))
            if len(out) >= limit:
                return out
    return out


class LoopGuard:
    """Finds the step's looping greedy answers (`check`) for the trainer's unlikelihood term."""

    def __init__(self, cfg: LoopGuardSettings, pad_id: int, eos_ids: Sequence[int]) -> None:
        self.cfg = cfg
        self.pad_id = pad_id
        self.eos_ids = [int(e) for e in eos_ids]

    @property
    def on(self) -> bool:
        return self.cfg.prompts > 0 and self.cfg.coef > 0

    def answer(self, module: torch.nn.Module, prompts: list[list[int]], device: torch.device) -> list[list[int]]:
        """The greedy answers of `module` to `prompts` (one left-padded batch), each cut before
        its end-of-sequence token."""
        from transformers import GenerationConfig

        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        config = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                  pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = module.generate(input_ids=ids, attention_mask=attention, generation_config=config)
        finally:
            module.train(was_training)
        answers = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
            answers.append(row[:cut])
        return answers

    def check(self, module: torch.nn.Module, batches: Sequence[Any],
              device: torch.device) -> tuple[LoopBatch | None, dict[str, float]]:
        """(the looping answers to push down, or None; the check's metrics)."""
        started = time.perf_counter()
        cfg = self.cfg
        prompts = contexts(batches, cfg.prompts, cfg.max_prompt_tokens)
        if not prompts:
            return None, {"loop_guard_answers": 0.0, "loop_guard_loops": 0.0, "loop_guard_s": 0.0}
        answers = self.answer(module, prompts, device)
        looping = [(p, a) for p, a in zip(prompts, answers) if loops(a, cfg.ngram, cfg.repeats)]
        rows = [(p, a, repeated_positions(a, cfg.unlikely_ngram)) for p, a in looping]
        rows = [r for r in rows if any(r[2])]
        metrics = {"loop_guard_answers": float(len(prompts)), "loop_guard_loops": float(len(looping))}
        batch = None
        if rows:
            length = max(len(p) + len(a) for p, a, _ in rows)
            input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), length), dtype=torch.long)
            mask = torch.zeros((len(rows), length - 1))
            for i, (p, a, rep) in enumerate(rows):
                input_ids[i, :len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
                attention[i, :len(p) + len(a)] = 1
                mask[i, len(p) - 1:len(p) - 1 + len(a)] = torch.tensor(rep, dtype=torch.float32)
            batch = LoopBatch(input_ids.to(device), attention.to(device), mask.to(device))
        metrics["loop_guard_s"] = time.perf_counter() - started
        return batch, metrics
