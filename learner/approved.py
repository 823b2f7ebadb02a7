"""The answers users approved, trained again in later steps (learner.approved).

Why: a personal agent's step trains each sample once, a few passes under the PPO clip, so an
answer the user approved (a reward above zero, or a hindsight revision) can raise its tokens'
probability only by the clip's factor before it is gone. Those answers are the clearest signal
a personal agent gets of what its user wants, and there are few of them: a couple of dozen in
the first 24 interactions of `nextstate bench personal`.

What: the learner remembers the newest `keep` approved answers of the steps it trained (context
and answer tokens, which of them were trained), and each later step trains up to `replay` of
them again, the least replayed first (among equals, the one remembered longest ago), as one
more micro-batch of at most the step's token budget: a precomputed advantage of `advantage`,
the policy at the step's first pass as their behaviour policy (ratio 1 there, the clip bounds
the later passes, no importance weight), as hindsight revisions are trained. Their tokens
count in the step's token total like every other trained token. A sample whose reward was
normalised in a task group (general agents) is not remembered: its advantage says how it
compared with its group, not that a user approved it. An answer longer than the token budget
is not remembered either. This is self-imitation (Oh et al., 2018) with the user's approval as
the return.

The memory is saved with the checkpoint (`state`), so a step replayed after a restart trains the
same answers again. Knows nothing about Kafka.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from learner.batching import Batch


class ApprovedMemory:
    """The newest `size` approved answers, each as (tokens, trained-target mask) with how often
    it was replayed. `state` goes into the checkpoint and back into the constructor."""

    def __init__(self, size: int, token_budget: int, state: Sequence[Sequence[Any]] = ()) -> None:
        self.size = size
        self.token_budget = token_budget
        self.replays: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}
        for ids, mask, n in state:
            self.replays[tuple(int(t) for t in ids)] = (tuple(int(m) for m in mask), int(n))
        self._trim()

    def __len__(self) -> int:
        return len(self.replays)

    def note(self, batches: Sequence[Batch]) -> int:
        """Remember the approved answers of a step's micro-batches: rows with a reward above
        zero that are not in a task group and not replays themselves. How many were new."""
        added = 0
        for batch in batches:
            for row in range(len(batch.rewards)):
                if (float(batch.rewards[row]) <= 0 or batch.task_groups[row] is not None
                        or bool(batch.replayed[row])):
                    continue
                n = int(batch.attention_mask[row].sum())
                if n > self.token_budget:
                    continue
                ids = tuple(int(t) for t in batch.input_ids[row, :n].tolist())
                mask = tuple(int(m > 0) for m in batch.mask[row, :n - 1].tolist())
                if not any(mask):
                    continue
                if ids not in self.replays:
                    added += 1
                self.replays[ids] = (mask, self.replays.pop(ids, (mask, 0))[1])
        self._trim()
        return added

    def draw(self, n: int) -> list[tuple[list[int], list[int]]]:
        """Up to `n` remembered answers, the least replayed first, that fit in one micro-batch of
        `token_budget` padded tokens; counted as replayed."""
        ranked = sorted(self.replays, key=lambda k: self.replays[k][1])
        out: list[tuple[list[int], list[int]]] = []
        longest = 0
        for ids in ranked:
            if len(out) >= n:
                break
            if (len(out) + 1) * max(longest, len(ids)) > self.token_budget:
                continue
            longest = max(longest, len(ids))
            mask, times = self.replays[ids]
            self.replays[ids] = (mask, times + 1)
            out.append((list(ids), list(mask)))
        return out

    def state(self) -> list[list[Any]]:
        return [[list(ids), list(mask), n] for ids, (mask, n) in self.replays.items()]

    def _trim(self) -> None:
        while len(self.replays) > self.size:
            del self.replays[next(iter(self.replays))]


def replay_batch(answers: Sequence[tuple[list[int], list[int]]], pad_id: int, advantage: float) -> Batch:
    """One right-padded micro-batch of remembered answers (`ApprovedMemory.draw`), laid out as
    learner.batching.collate lays out samples: each row's precomputed advantage `advantage`,
    marked `replayed` (the trainer takes its first pass's logprobs as their behaviour), no
    teacher."""
    b = len(answers)
    length = max(len(ids) for ids, _ in answers)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, length - 1))
    for i, (ids, trained) in enumerate(answers):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, :len(ids)] = 1
        mask[i, :len(trained)] = torch.tensor(trained, dtype=torch.float32)
    zeros = torch.zeros((b, length - 1))
    return Batch(
        input_ids=input_ids, attention_mask=attention, mask=mask, behaviour=zeros.clone(),
        teacher=zeros.clone(), has_teacher=torch.zeros(b),
        top_ids=torch.zeros((b, length - 1, 0), dtype=torch.long), top_logprobs=torch.zeros((b, length - 1, 0)),
        top_valid=torch.zeros((b, length - 1, 0), dtype=torch.bool), has_top=torch.zeros(b),
        rewards=torch.ones(b), advantage=torch.full((b,), float(advantage)), has_advantage=torch.ones(b),
        stale=torch.ones(b, dtype=torch.bool), revision=torch.zeros(b, dtype=torch.bool),
        replayed=torch.ones(b, dtype=torch.bool), answer=torch.zeros(b, dtype=torch.bool),
        sample_ids=[f"replay:{i}" for i in range(b)], task_groups=[None] * b, step_indices=[None] * b)
