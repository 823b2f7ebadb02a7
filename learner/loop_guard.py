"""The policy's own greedy answers, checked for loops before a step (sequence-level unlikelihood).

Why: a personal agent's users are served sampled answers, which hardly ever loop, so no user
rejects a loop and no reward reaches one; yet after a few updates SmolLM2-135M's *greedy*
answers began to loop a sentence or a list item until the token limit (the first-token
distribution flattens, a greedy answer starts where it peaks, and the base model's own
repetition takes over). A client that asks for temperature 0 gets those answers.

What: before a step, the policy answers greedily up to `prompts` of the step's contexts and up
to `recall` earlier ones (`ContextMemory`: the contexts this learner trained on, those checked
least often first), so a loop the step's few contexts do not show can still be found; and for
each, the greedy answers that begin with the first tokens nearly as likely as the greedy one
(`starts`, `start_ratio`), where the next update may move the greedy start. An
answer loops when one `ngram`-token sequence occurs in it `repeats` times or more (token ids:
any language or format reads the same), or, where the guard can decode, when it says one
sentence three times or more (infra.repetition: the definition the simulated users and the
benchmark hold answers to; it catches numbered lists that repeat an item under new numbers,
which no token n-gram repeats). A token of a looping answer is a repeat when it completes an
`unlikely_ngram`-gram already seen earlier in the answer, or belongs to a later saying of a
sentence said three times; the step also minimises -log(1 - p) of the repeats (Welleck et
al.'s unlikelihood, bounded: its push fades as p falls), which moves the greedy path off the
repetition rather than pushing down everything the answer said. Answers that do not loop
add nothing.

Greedy decoding of the same weights and contexts gives the same answers, and the memory is
saved with the checkpoint (`ContextMemory.state`), so a step replayed after a restart checks
and penalises what it did the first time. Knows nothing about Kafka.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from infra.repetition import repeated_sentences
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


def char_ends(ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[int]:
    """Where each token's text ends in `decode(ids)`: the length of the decoded prefix through it
    (never less than the one before: a token holding half a character decodes to nothing yet)."""
    ends, last = [], 0
    for i in range(1, len(ids) + 1):
        last = max(last, len(decode(list(ids[:i]))))
        ends.append(last)
    return ends


def sentence_repeat_positions(ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[int]:
    """1 at each token of a later saying of a sentence the decoded answer says three times or
    more (infra.repetition.repeated_sentences), else 0; all 0 when it says none that often."""
    out = [0] * len(ids)
    spans = repeated_sentences(decode(list(ids)))
    if not spans:
        return out
    ends = char_ends(ids, decode)
    for i, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
        if any(start < s.end and end > s.start for s in spans):
            out[i] = 1
    return out


class ContextMemory:
    """The distinct contexts a learner trained on, the newest `size` of them, with how often
    each was checked: `recall` hands out those checked least often (among equals, the one
    noted longest ago first), so over the steps every remembered context gets its turn.
    `state` goes into the checkpoint and back into the constructor."""

    def __init__(self, size: int, state: Sequence[Sequence[Any]] = ()) -> None:
        self.size = size
        self.checks: dict[tuple[int, ...], int] = {}
        for ctx, n in state:
            self.checks[tuple(int(t) for t in ctx)] = int(n)
        self._trim()

    def note(self, checked: Sequence[Sequence[int]], seen: Sequence[Sequence[int]] = ()) -> None:
        """Remember `checked` (now checked once more) and `seen` (not checked this time)."""
        for ctx in checked:
            key = tuple(ctx)
            self.checks[key] = self.checks.pop(key, 0) + 1
        for ctx in seen:
            key = tuple(ctx)
            self.checks[key] = self.checks.pop(key, 0)
        self._trim()

    def recall(self, n: int, exclude: Sequence[Sequence[int]] = ()) -> list[list[int]]:
        """Up to `n` remembered contexts not in `exclude`, the least checked first; not yet
        counted as checked (`note` does that)."""
        excluded = {tuple(c) for c in exclude}
        ranked = sorted((k for k in self.checks if k not in excluded), key=self.checks.__getitem__)
        return [list(k) for k in ranked[:n]]

    def state(self) -> list[list[Any]]:
        return [[list(k), n] for k, n in self.checks.items()]

    def _trim(self) -> None:
        while len(self.checks) > self.size:
            del self.checks[next(iter(self.checks))]


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


class _FirstScores:
    """A logits processor for `generate` that keeps the first step's probabilities and changes
    nothing (greedy: the first step's scores are the model's logits)."""

    def __init__(self) -> None:
        self.probs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.probs is None:
            self.probs = scores.detach().float().softmax(-1)
        return scores


class LoopGuard:
    """Finds the step's looping greedy answers (`check`) for the trainer's unlikelihood term.
    `decode` (token ids -> text; None: token n-grams only) lets it read sentences."""

    def __init__(self, cfg: LoopGuardSettings, pad_id: int, eos_ids: Sequence[int],
                 decode: Callable[[list[int]], str] | None = None) -> None:
        self.cfg = cfg
        self.pad_id = pad_id
        self.eos_ids = [int(e) for e in eos_ids]
        self.decode = decode
        self.memory = ContextMemory(cfg.memory)

    @property
    def on(self) -> bool:
        return self.cfg.prompts > 0 and self.cfg.coef > 0

    def repeats(self, answer: Sequence[int]) -> list[int] | None:
        """The repeats of `answer` to push down (1 per token; with `first`, its first tokens too),
        or None when it does not loop."""
        cfg = self.cfg
        marks = repeated_positions(answer, cfg.unlikely_ngram) if loops(answer, cfg.ngram, cfg.repeats) else None
        if self.decode is not None:
            said = sentence_repeat_positions(answer, self.decode)
            if any(said):
                marks = said if marks is None else [max(a, b) for a, b in zip(marks, said)]
        if marks is not None and cfg.first > 0:
            # the start that led into it: "1." where the greedy answer became "1. 1. 1."
            marks = [1 if i < cfg.first else m for i, m in enumerate(marks)]
        return marks

    def answer(self, module: torch.nn.Module, prompts: list[list[int]], device: torch.device) -> list[list[int]]:
        """The greedy answers of `module` to `prompts` (one left-padded batch), each cut before
        its end-of-sequence token."""
        return self._greedy(module, prompts, self.cfg.max_new_tokens, device)[0]

    def _greedy(self, module: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
                device: torch.device, first: bool = False) -> tuple[list[list[int]], torch.Tensor | None]:
        """(the greedy answers to `prompts`, with `first` the first answer token's probabilities
        [B, V], else None). Only the first step's scores are kept, not every step's."""
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None)
        capture = _FirstScores()
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = module.generate(input_ids=ids, attention_mask=attention, generation_config=config,
                                      logits_processor=LogitsProcessorList([capture] if first else []))
        finally:
            module.train(was_training)
        answers = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
            answers.append(row[:cut])
        return answers, capture.probs

    def rival_starts(self, first: torch.Tensor) -> list[list[int]]:
        """Per prompt, the first tokens other than the greedy one that are at least `start_ratio`
        as likely as it, the likeliest first, at most `starts` (end-of-sequence never)."""
        cfg = self.cfg
        top = first.topk(min(cfg.starts + 1 + len(self.eos_ids), first.shape[-1]), dim=-1)
        out = []
        for probs, ids in zip(top.values.tolist(), top.indices.tolist()):
            floor = cfg.start_ratio * probs[0]
            out.append([t for p, t in zip(probs[1:], ids[1:]) if p >= floor and t not in self.eos_ids][:cfg.starts])
        return out

    def answers(self, module: torch.nn.Module, prompts: list[list[int]],
                device: torch.device) -> list[tuple[list[int], list[int]]]:
        """(context, answer) pairs: each prompt's greedy answer, then for each of its rival
        starts (`rival_starts`) the greedy answer that begins with that token (its context is
        still the prompt: the start is part of the answer). A flattened first-token
        distribution is where loops came from: a greedy answer starts wherever it peaks, and an
        update can move the peak to any rival, whose continuation may be the base model's own
        repetition ("1. " followed by "1. 1. 1."). Checking the rivals finds that loop a step
        before the greedy answer would fall into it."""
        starts = self.cfg.starts > 0
        greedy, first = self._greedy(module, prompts, self.cfg.max_new_tokens, device, first=starts)
        pairs = [(p, a) for p, a in zip(prompts, greedy)]
        if first is None:
            return pairs
        branches = [(p, t) for p, rivals in zip(prompts, self.rival_starts(first)) for t in rivals]
        if branches and self.cfg.max_new_tokens > 1:
            rest, _ = self._greedy(module, [p + [t] for p, t in branches], self.cfg.max_new_tokens - 1, device)
            pairs += [(p, [t] + a) for (p, t), a in zip(branches, rest)]
        return pairs

    def check(self, module: torch.nn.Module, batches: Sequence[Any],
              device: torch.device) -> tuple[LoopBatch | None, dict[str, float], list[list[int]]]:
        """(the looping answers to push down, or None; the check's metrics; the prompts it
        answered, for `recheck` after the update)."""
        cfg = self.cfg
        own = contexts(batches, max(cfg.prompts, cfg.memory), cfg.max_prompt_tokens)
        checked = own[:cfg.prompts]
        recalled = self.memory.recall(cfg.recall, exclude=own)
        self.memory.note(checked + recalled, seen=own[cfg.prompts:])
        prompts = checked + recalled
        batch, metrics = self.find(module, prompts, device)
        metrics["loop_guard_recalled"] = float(len(recalled))
        return batch, metrics, prompts

    def recheck(self, module: torch.nn.Module, prompts: list[list[int]],
                device: torch.device) -> tuple[LoopBatch | None, dict[str, float]]:
        """The same check of `prompts` on the updated weights, before they are published: the
        probes and the users meet the weights a step produced, and a check before the next
        step would find its loops only after they were served. Nothing is noted in the memory
        (those prompts were noted by `check`)."""
        return self.find(module, prompts, device)

    def find(self, module: torch.nn.Module, prompts: list[list[int]],
             device: torch.device) -> tuple[LoopBatch | None, dict[str, float]]:
        """(the looping answers of `module` to `prompts` with their repeats marked, or None; metrics)."""
        started = time.perf_counter()
        if not prompts:
            return None, {"loop_guard_answers": 0.0, "loop_guard_starts": 0.0,
                          "loop_guard_loops": 0.0, "loop_guard_s": 0.0}
        pairs = self.answers(module, prompts, device)
        marked = [(p, a, self.repeats(a)) for p, a in pairs]
        looping = [r for r in marked if r[2] is not None]
        rows = [(p, a, rep) for p, a, rep in looping if any(rep)]
        metrics = {"loop_guard_answers": float(len(prompts)),
                   "loop_guard_starts": float(len(pairs) - len(prompts)),
                   "loop_guard_loops": float(len(looping))}
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
