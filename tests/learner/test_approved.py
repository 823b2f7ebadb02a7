"""The memory of approved answers (learner.approved): what it remembers from a step, what a
later step trains again, and what comes back with a checkpoint."""

from __future__ import annotations

from learner.approved import ApprovedMemory, replay_batch
from learner.batching import collate
from tests.learner.samples import make_sample


def test_only_answers_a_user_approved_are_remembered_and_the_least_replayed_come_back_first():
    memory = ApprovedMemory(size=8, token_budget=64)
    approved = make_sample(1, reward=1.0)
    rejected = make_sample(2, reward=-1.0)
    neutral = make_sample(3, reward=0.0)
    grouped = make_sample(4, reward=1.0, task_group="g", step_index=0)   # a group's advantage, not a user's approval
    untrained = make_sample(5, reward=1.0, loss_mask=[0, 0, 0])
    assert memory.note([collate([approved, rejected, neutral, grouped, untrained], pad_id=0)]) == 1
    ids = [*approved.prompt_token_ids, *approved.response_token_ids]
    # the mask is aligned to targets: the response's tokens are targets 3..5 of a 4-token prompt
    assert memory.draw(4) == [(ids, [0, 0, 0, 1, 1, 1])]
    later = make_sample(6, reward=1.0, prompt_len=6)
    assert memory.note([collate([later, approved], pad_id=0)]) == 1   # the same answer again is not new
    drawn = memory.draw(1)
    assert drawn[0][0] == [*later.prompt_token_ids, *later.response_token_ids]   # replayed 0 times before
    assert [n for _, _, n in memory.state()] == [1, 1]


def test_the_memory_keeps_the_newest_answers_that_fit_the_budget_and_comes_back_from_its_state():
    memory = ApprovedMemory(size=2, token_budget=16)
    samples = [make_sample(i, reward=1.0, prompt_len=4) for i in range(3)]
    long = make_sample(9, reward=1.0, prompt_len=20)   # 23 tokens: more than one micro-batch holds
    assert memory.note([collate([*samples, long], pad_id=0)]) == 3   # the long one not; the oldest then dropped
    kept = [ids for ids, _, _ in memory.state()]
    assert kept == [[*s.prompt_token_ids, *s.response_token_ids] for s in samples[1:]]
    # two 7-token answers fit 16 padded tokens, a third would not: one micro-batch at most
    memory = ApprovedMemory(size=4, token_budget=16)
    memory.note([collate(samples, pad_id=0)])
    assert len(memory.draw(3)) == 2
    again = ApprovedMemory(size=4, token_budget=16, state=memory.state())
    assert again.state() == memory.state()
    assert again.draw(1)[0][0] == [*samples[2].prompt_token_ids, *samples[2].response_token_ids]


def test_a_replay_batch_is_laid_out_like_a_collated_sample_with_its_own_advantage():
    sample = make_sample(1, reward=1.0, loss_mask=[1, 0, 1])
    collated = collate([sample], pad_id=0)
    memory = ApprovedMemory(size=4, token_budget=64)
    memory.note([collated])
    batch = replay_batch(memory.draw(1), pad_id=0, advantage=0.5)
    assert batch.input_ids.tolist() == collated.input_ids.tolist()
    assert batch.mask.tolist() == collated.mask.tolist()
    assert batch.replayed.tolist() == [True] and batch.revision.tolist() == [False]
    assert batch.advantage.tolist() == [0.5] and batch.has_advantage.tolist() == [1.0]
    assert batch.has_teacher.tolist() == [0.0] and batch.top_ids.shape[-1] == 0
