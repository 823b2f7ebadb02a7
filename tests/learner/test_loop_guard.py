"""The learner's check of its own greedy answers: which answers loop, which of their tokens are
repeats, which contexts of a step are checked (learner.loop_guard); the trainer's use of it is
in test_trainer."""

from __future__ import annotations

import torch

from learner.batching import collate
from learner.loop_guard import contexts, loops, most_repeated, repeated_positions
from tests.learner.samples import make_sample


def test_a_sequence_repeated_three_times_is_a_loop_and_two_times_is_not():
    sentence = [5, 6, 7, 8, 9, 10, 11, 12]
    twice = [1, 2, *sentence, 3, *sentence, 4]
    thrice = [*twice, *sentence]
    assert most_repeated(twice, 8) == 2 and not loops(twice, 8, 3)
    assert most_repeated(thrice, 8) == 3 and loops(thrice, 8, 3)
    # shorter than the n-gram: nothing repeats
    assert most_repeated([1, 2, 3], 8) == 0 and not loops([1, 2, 3], 8, 3)
    # a list whose items differ by their number still loops on the item's text
    item = [40, 41, 42, 43, 44, 45, 46, 47]
    numbered = [t for k in range(4) for t in (100 + k, 13, *item, 10)]
    assert loops(numbered, 8, 3) and not loops(numbered, 12, 3)


def test_repeats_are_the_tokens_that_complete_an_ngram_seen_before():
    ids = [1, 2, 3, 4, 1, 2, 3, 4, 9]
    #        first time: nothing    the 4-gram 1 2 3 4 again ends at index 7
    assert repeated_positions(ids, 4) == [0, 0, 0, 0, 0, 0, 0, 1, 0]
    # bigrams: "1 2", "2 3", "3 4" again at 5, 6, 7
    assert repeated_positions(ids, 2) == [0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert repeated_positions([7, 7, 7, 7], 1) == [0, 1, 1, 1]
    assert repeated_positions([], 4) == []


def test_the_checked_contexts_are_each_samples_tokens_before_its_first_trained_one():
    a = make_sample(1, prompt_len=4, response_len=3)
    b = make_sample(2, prompt_len=6, response_len=2, loss_mask=[0, 1])   # first trained token: the 2nd
    same_context = make_sample(3, prompt_len=4, response_len=5).model_copy(
        update={"prompt_token_ids": a.prompt_token_ids})
    long = make_sample(4, prompt_len=20, response_len=2)
    batches = [collate([a, b, same_context], 0), collate([long], 0)]
    got = contexts(batches, limit=8, max_tokens=16)
    assert got == [list(a.prompt_token_ids), [*b.prompt_token_ids, b.response_token_ids[0]]]
    assert contexts(batches, limit=1, max_tokens=16) == [list(a.prompt_token_ids)]
    assert contexts(batches, limit=8, max_tokens=32)[-1] == list(long.prompt_token_ids)
    # a sample with nothing trained has no context to check
    none = collate([make_sample(5, loss_mask=[0, 0, 0])], 0)
    assert torch.equal(none.mask, torch.zeros_like(none.mask)) and contexts([none], 8, 16) == []
