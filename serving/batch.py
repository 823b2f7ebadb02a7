"""The decoding batch of the local engine: sequences sharing one left-padded KV cache.

Continuous batching on a plain transformers model: every sequence in a `Batch` decodes one
token per step in a single forward pass. A new sequence is prefilled alone (its own cache)
and then *joins* between steps: both caches are left-padded to a common length and
concatenated on the batch axis, the attention mask marks the padding, and each sequence
keeps its own position ids, so padding never changes what a sequence computes. Finished
sequences *leave* by index selection, and padding columns that no sequence needs any more
are trimmed. A batch belongs to one policy (model + adapter): requests stay pinned to the
weights they started on.

Only tensor bookkeeping lives here; sampling is `serving.sampling`, scheduling `serving.local`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


def cache_layers(cache: Any) -> list[Any]:
    """The per-layer key/value holders of a transformers DynamicCache."""
    return list(cache.layers)


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad `n` zeros before the sequence axis (-2) of a [B, H, L, D] tensor."""
    return t if n == 0 else F.pad(t, (0, 0, n, 0))


@dataclass
class Batch:
    """Sequences decoding together: cache [B, H, L, D] per layer, mask [B, L]."""

    seqs: list[Any] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None        # 1 = real token, 0 = left padding
    next_ids: torch.Tensor | None = None    # [B] token each sequence feeds at the next step
    next_pos: torch.Tensor | None = None    # [B] its position id

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def join(self, seq: Any, cache: Any, prompt_len: int, next_id: int) -> None:
        """Add a prefilled sequence whose cache holds exactly its `prompt_len` tokens."""
        device = cache_layers(cache)[0].keys.device
        mask = torch.ones(1, prompt_len, dtype=torch.long, device=device)
        nid = torch.tensor([next_id], dtype=torch.long, device=device)
        pos = torch.tensor([prompt_len], dtype=torch.long, device=device)
        if not self.seqs:
            self.seqs, self.cache, self.mask, self.next_ids, self.next_pos = [seq], cache, mask, nid, pos
            return
        target = max(self.length, prompt_len)
        pad_old, pad_new = target - self.length, target - prompt_len
        for old, new in zip(cache_layers(self.cache), cache_layers(cache), strict=True):
            old.keys = torch.cat([_left_pad(old.keys, pad_old), _left_pad(new.keys, pad_new)])
            old.values = torch.cat([_left_pad(old.values, pad_old), _left_pad(new.values, pad_new)])
        self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
        self.next_ids = torch.cat([self.next_ids, nid])
        self.next_pos = torch.cat([self.next_pos, pos])
        self.seqs.append(seq)

    def step_inputs(self) -> dict[str, Any]:
        """Model kwargs for one decode step: each sequence feeds its last sampled token."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return {
            "input_ids": self.next_ids[:, None],
            "attention_mask": self.mask,
            "position_ids": self.next_pos[:, None],
            "past_key_values": self.cache,
            "use_cache": True,
        }

    def advance(self, sampled: list[int]) -> None:
        self.next_ids = torch.tensor(sampled, dtype=torch.long, device=self.next_ids.device)
        self.next_pos = self.next_pos + 1

    def keep(self, keep: list[int]) -> None:
        """Keep only the sequences at indices `keep`, then trim padding nobody needs."""
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self.seqs, self.cache, self.mask, self.next_ids, self.next_pos = [], None, None, None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.seqs = [self.seqs[i] for i in keep]
        self.mask = self.mask.index_select(0, idx)
        self.next_ids = self.next_ids.index_select(0, idx)
        self.next_pos = self.next_pos.index_select(0, idx)
        drop = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-pad columns
        self.mask = self.mask[:, drop:]
        for layer in cache_layers(self.cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, drop:]
            layer.values = layer.values.index_select(0, idx)[:, :, drop:]
