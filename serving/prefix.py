"""The local engine's prefix cache: KV caches of earlier prompts, reused by prompts that start
the same way.

Agent runtimes resend the same long system prompt and the whole history every turn (OpenClaw:
~40,000 characters); without this the engine prefills all of it every time. After a prompt is
prefilled, its KV cache is kept here; a later request on the *same policy* takes the entry with
the longest common token prefix and prefills only the rest.

- Keyed by token ids, not text: the tokens are what the KV cache was computed from.
- Bounded by memory (``serving.prefix_cache_mb``): least recently used entries go first; an
  entry that a new prompt extends is replaced by it (a conversation keeps one entry, not one per
  turn).
- Safe across weight swaps: an entry belongs to the `Policy` (weights + adapter + version) that
  computed it and only a request pinned to that same policy can use it. The engine drops a
  policy's entries when the policy is retired or superseded.
- At least one prompt token is always prefilled (its logits start the generation); a score
  reuses only what lies before its first scored position.

Plain full-attention caches only (``DynamicLayer``): a sliding-window or recurrent layer cannot
be cut at an arbitrary position, so such models get no prefix cache. Knows nothing about
scheduling; `serving.local` calls `lookup` and `store`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two 1-d token tensors."""
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


def croppable(cache: Any) -> bool:
    return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)


@dataclass(eq=False)   # entries are told apart by identity (tensors do not compare to a bool)
class Entry:
    policy: Any                      # serving.localmodel.Policy
    tokens: torch.Tensor             # 1-d, on the CPU
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per layer, [1, H, len(tokens), D]
    nbytes: int
    used: int = 0                    # tick of the last lookup or store


@dataclass
class PrefixCache:
    capacity_bytes: int
    min_tokens: int = 64             # shorter matches are not worth a copy
    entries: list[Entry] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0, "reused_tokens": 0,
                                                           "stored": 0, "evicted": 0})
    _tick: int = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def lookup(self, policy: Any, tokens: list[int], limit: int) -> tuple[Any, int]:
        """(a fresh DynamicCache holding the first n tokens' KV, n) for the longest reusable
        prefix of `tokens` on `policy`, at most `limit` tokens; (None, 0) if there is none."""
        from transformers import DynamicCache

        if not self.entries or limit < self.min_tokens:
            self.stats["misses"] += 1
            return None, 0
        want = torch.tensor(tokens[:limit], dtype=torch.long)
        best, n = None, 0
        for entry in self.entries:
            if entry.policy is policy:
                m = common_prefix(entry.tokens, want)
                if m > n:
                    best, n = entry, m
        if best is None or n < self.min_tokens:
            self.stats["misses"] += 1
            return None, 0
        self._tick += 1
        best.used = self._tick
        cache = DynamicCache()
        for i, (k, v) in enumerate(best.kv):
            cache.update(k[:, :, :n], v[:, :, :n], i)   # copies: the entry stays as it was
        self.stats["hits"] += 1
        self.stats["reused_tokens"] += n
        return cache, n

    def store(self, policy: Any, tokens: list[int], cache: Any) -> bool:
        """Keep a copy of `cache` (exactly the KV of `tokens`) for later prompts on `policy`."""
        if len(tokens) < self.min_tokens or not croppable(cache):
            return False
        key = torch.tensor(tokens, dtype=torch.long)
        if any(e.policy is policy and common_prefix(e.tokens, key) == key.numel() for e in self.entries):
            return False   # an entry already holds this prompt (and maybe more)
        kv = [(layer.keys.detach().clone(), layer.values.detach().clone()) for layer in cache.layers]
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.capacity_bytes:
            return False
        # an entry this prompt extends is covered by the new one
        self.entries = [e for e in self.entries
                        if not (e.policy is policy and common_prefix(e.tokens, key) == e.tokens.numel())]
        self._tick += 1
        self.entries.append(Entry(policy, key, kv, nbytes, self._tick))
        self.stats["stored"] += 1
        while self.nbytes > self.capacity_bytes:
            oldest = min(self.entries, key=lambda e: e.used)
            self.entries = [e for e in self.entries if e is not oldest]
            self.stats["evicted"] += 1
        return True

    def keep_only(self, policies: list[Any]) -> None:
        """Drop the entries of every policy not in `policies` (retired or superseded weights)."""
        self.entries = [e for e in self.entries if any(e.policy is p for p in policies)]
