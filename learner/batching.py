"""Samples -> micro-batches: validation, packing by token budget, padding and collation.

A micro-batch holds as many samples as fit in `token_budget` *padded* tokens
(samples × longest sequence); one optimizer step is at most `grad_accum` micro-batches. A
sample longer than the budget on its own gets a micro-batch to itself rather than being cut:
cutting would train on something other than what was sampled.

Collated tensors are aligned to target tokens: position t of every per-token tensor belongs to
token t+1 of the sequence, so the response token i sits at ``len(prompt) − 1 + i``. Knows
nothing about Kafka, models or optimizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from infra.errors import LearnerError
from schemas.events import SampleReady
from schemas.methods import MethodRule


class InvalidSample(LearnerError):
    """A sample whose arrays disagree, or that cannot be trained on at all."""


def validate(sample: SampleReady, vocab_size: int | None = None) -> None:
    """Raise InvalidSample naming the mismatch (SampleReady.problem), or a token id the model's
    vocabulary of `vocab_size` does not have (a sample made for another model would otherwise
    fail the step's lookup, again at every restart); silent if well formed.

    A well-formed sample that the run's method has no signal for (an RL-only sample in an
    `opd` run) is not invalid: the feeder skips and counts it (`has_signal`)."""
    problem = sample.problem()
    if problem:
        raise InvalidSample(problem)
    if vocab_size is not None:
        for name in ("prompt_token_ids", "response_token_ids", "teacher_top_ids"):
            ids = getattr(sample, name) or ()
            if ids and (max(ids) >= vocab_size or min(ids) < 0):
                raise InvalidSample(f"sample {sample.event_id} has {name} outside the model's "
                                    f"vocabulary of {vocab_size} (ids {min(ids)}..{max(ids)})")


def has_signal(sample: SampleReady, method: MethodRule, revisions: bool = True,
               teacher_answers: float = 1.0) -> bool:
    """False for a sample this run can learn nothing from: one without teacher logprobs in a run
    whose method needs them, one whose only term is a precomputed advantage (general
    agents' group stage) that is 0 or covers no token (a dropped bucket, a group of equal
    outcomes): its gradient would be zero, and skipping it is what the group stage asks; a
    hindsight revision in a run that does not train on them (`revisions` off); and a teacher's
    own answer in a run that weighs them 0 (`teacher_answers`)."""
    if sample.teacher_answer:
        if teacher_answers <= 0:
            return False
    elif sample.revision_of is not None and not revisions:
        return False
    if method.needs_teacher_logprobs and sample.teacher_logprobs is None:
        return False
    teacher = method.teacher_term and sample.teacher_logprobs is not None
    if sample.advantage is not None and not teacher:
        return abs(sample.advantage) > 1e-12 and any(sample.loss_mask)
    return True


def seq_len(sample: SampleReady) -> int:
    return len(sample.prompt_token_ids) + len(sample.response_token_ids)


def pack(samples: Sequence[SampleReady], token_budget: int) -> list[list[SampleReady]]:
    """Greedy, order-preserving: start a new micro-batch when the padded size would pass the budget."""
    batches: list[list[SampleReady]] = []
    current: list[SampleReady] = []
    longest = 0
    for s in samples:
        n = seq_len(s)
        if current and (len(current) + 1) * max(longest, n) > token_budget:
            batches.append(current)
            current, longest = [], 0
        current.append(s)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


@dataclass
class StepCollector:
    """Gathers samples until one optimizer step's micro-batches are full.

    `add` returns False (and keeps nothing) when the sample would need micro-batch
    number grad_accum + 1; the caller then trains the step and offers the sample again.
    """

    token_budget: int
    grad_accum: int
    samples: list[SampleReady]

    @classmethod
    def empty(cls, token_budget: int, grad_accum: int) -> "StepCollector":
        return cls(token_budget, grad_accum, [])

    def add(self, sample: SampleReady) -> bool:
        if self.samples and len(pack([*self.samples, sample], self.token_budget)) > self.grad_accum:
            return False
        self.samples.append(sample)
        return True

    def full(self) -> bool:
        batches = pack(self.samples, self.token_budget)
        if len(batches) < self.grad_accum:
            return False
        last = batches[-1]
        return len(last) * max(map(seq_len, last)) >= self.token_budget

    def micro_batches(self) -> list[list[SampleReady]]:
        return pack(self.samples, self.token_budget)


@dataclass
class Batch:
    """One padded micro-batch; per-token tensors are [B, L-1], aligned to targets."""

    input_ids: torch.Tensor        # [B, L] long
    attention_mask: torch.Tensor   # [B, L] long
    mask: torch.Tensor             # [B, L-1] float, 1 = trained response token
    behaviour: torch.Tensor        # [B, L-1] float
    teacher: torch.Tensor          # [B, L-1] float, 0 where no teacher
    has_teacher: torch.Tensor      # [B] float
    top_ids: torch.Tensor          # [B, L-1, K] long, the teacher's top-K ids (K = 0: none in the batch)
    top_logprobs: torch.Tensor     # [B, L-1, K] float, their teacher logprobs
    top_valid: torch.Tensor        # [B, L-1, K] bool, a real entry (not padding)
    has_top: torch.Tensor          # [B] float, 1 where the sample carries top-K rows
    rewards: torch.Tensor          # [B] float
    advantage: torch.Tensor        # [B] float, the precomputed advantage (0 where none)
    has_advantage: torch.Tensor    # [B] float, 1 where the sample carries one
    stale: torch.Tensor            # [B] bool, importance-corrected rather than PPO-ratioed
    revision: torch.Tensor         # [B] bool, a hindsight revision: its behaviour logprobs are another context's
    replayed: torch.Tensor         # [B] bool, an approved answer trained again (learner.approved): no behaviour logprobs
    answer: torch.Tensor           # [B] bool, the hinted teacher's own answer: a revision whose advantage learner.teacher_answers weighs
    sample_ids: list[str]
    task_groups: list[str | None]
    step_indices: list[int | None]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "Batch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return Batch(**moved)


def collate(samples: Sequence[SampleReady], pad_id: int, stale: Sequence[bool] | None = None) -> Batch:
    """Right-pad `samples` into one Batch; `stale[i]` marks samples to importance-correct."""
    if not samples:
        raise LearnerError("collate() got no samples")
    b = len(samples)
    length = max(map(seq_len, samples))
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, length - 1))
    behaviour = torch.zeros((b, length - 1))
    teacher = torch.zeros((b, length - 1))
    k = max(s.teacher_top_k for s in samples)
    top_ids = torch.zeros((b, length - 1, k), dtype=torch.long)
    top_lp = torch.zeros((b, length - 1, k))
    top_valid = torch.zeros((b, length - 1, k), dtype=torch.bool)
    for i, s in enumerate(samples):
        ids = [*s.prompt_token_ids, *s.response_token_ids]
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        start, n = len(s.prompt_token_ids) - 1, len(s.response_token_ids)
        mask[i, start: start + n] = torch.tensor(s.loss_mask, dtype=torch.float32)
        behaviour[i, start: start + n] = torch.tensor(s.behaviour_logprobs, dtype=torch.float32)
        if s.teacher_logprobs is not None:
            teacher[i, start: start + n] = torch.tensor(s.teacher_logprobs, dtype=torch.float32)
        if k_i := s.teacher_top_k:   # rows of a validated sample: ids and logprobs, n·K each
            top_ids[i, start: start + n, :k_i] = torch.tensor(s.teacher_top_ids, dtype=torch.long).view(n, k_i)
            top_lp[i, start: start + n, :k_i] = torch.tensor(s.teacher_top_logprobs,
                                                             dtype=torch.float32).view(n, k_i)
            top_valid[i, start: start + n, :k_i] = True
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        mask=mask,
        behaviour=behaviour,
        teacher=teacher,
        has_teacher=torch.tensor([float(s.teacher_logprobs is not None) for s in samples]),
        top_ids=top_ids,
        top_logprobs=top_lp,
        top_valid=top_valid,
        has_top=torch.tensor([float(s.teacher_top_k > 0) for s in samples]),
        rewards=torch.tensor([float(s.reward) for s in samples]),
        advantage=torch.tensor([float(s.advantage or 0.0) for s in samples]),
        has_advantage=torch.tensor([float(s.advantage is not None) for s in samples]),
        stale=torch.tensor(list(stale) if stale is not None else [False] * b, dtype=torch.bool),
        revision=torch.tensor([s.revision_of is not None for s in samples], dtype=torch.bool),
        replayed=torch.zeros(b, dtype=torch.bool),
        answer=torch.tensor([s.teacher_answer for s in samples], dtype=torch.bool),
        sample_ids=[s.event_id for s in samples],
        task_groups=[s.task_group for s in samples],
        step_indices=[s.step_index for s in samples],
    )
