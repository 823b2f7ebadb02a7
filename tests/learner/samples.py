"""Small SampleReady builders shared by the learner tests (tiny vocab, tiny sequences)."""

from __future__ import annotations

import random

from schemas.events import Method, SampleReady


def make_sample(i: int, prompt_len: int = 4, response_len: int = 3, reward: float = 1.0,
                method: Method = Method.RL, teacher: bool = False, policy_version: int = 0,
                loss_mask: list[int] | None = None, vocab: int = 200,
                task_group: str | None = None, step_index: int | None = None) -> SampleReady:
    rng = random.Random(i)
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
        reward=reward,
        policy_version=policy_version,
        task_group=task_group,
        step_index=step_index,
    )
