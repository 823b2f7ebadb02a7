"""Small SampleReady builders shared by the learner tests (tiny vocab, tiny sequences)."""

from __future__ import annotations

import math
import random

from schemas.events import Method, SampleReady


def make_sample(i: int, prompt_len: int = 4, response_len: int = 3, reward: float = 1.0,
                method: Method = Method.RL, teacher: bool = False, policy_version: int = 0,
                loss_mask: list[int] | None = None, vocab: int = 200,
                task_group: str | None = None, step_index: int | None = None,
                top_k: int = 0) -> SampleReady:
    """`top_k` > 0 (with `teacher`) adds teacher top-K rows: ids k·7 + position, the first
    with logprob −0.5 and the rest sharing what is left of 0.9 of the mass."""
    rng = random.Random(i)
    top_ids = top_lps = None
    if teacher and top_k:
        rest = math.log(0.9 - math.exp(-0.5)) - math.log(max(top_k - 1, 1))
        top_ids = [(k * 7 + pos) % vocab for pos in range(response_len) for k in range(top_k)]
        top_lps = [-0.5 if k == 0 else rest for _ in range(response_len) for k in range(top_k)]
    return SampleReady(
        tenant="t",
        session_id=f"s{i % 5}",
        turn_index=i,
        method=method,
        prompt_token_ids=[rng.randrange(vocab) for _ in range(prompt_len)],
        response_token_ids=[rng.randrange(vocab) for _ in range(response_len)],
        loss_mask=loss_mask if loss_mask is not None else [1] * response_len,
        behaviour_logprobs=[-5.5 + 0.01 * k for k in range(response_len)],
        teacher_logprobs=[-5.0] * response_len if teacher else None,
        teacher_top_ids=top_ids,
        teacher_top_logprobs=top_lps,
        reward=reward,
        policy_version=policy_version,
        task_group=task_group,
        step_index=step_index,
    )
