"""The learner's check of its own greedy answers: which answers loop, which of their tokens are
repeats, which contexts of a step are checked (learner.loop_guard); the trainer's use of it is
in test_trainer."""

from __future__ import annotations

import torch

from learner.batching import collate
from infra.settings import LoopGuardSettings
from learner.loop_guard import (ContextMemory, LoopGuard, char_ends, contexts, loops, most_repeated, repeated_positions,
                                sentence_repeat_positions)
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


# a toy vocabulary: 8 and 9 are the two halves of "é" (alone, 8 decodes to a replacement sign)
VOCAB = {1: "1", 2: ".", 3: " ", 4: "Practice", 5: "\n", 6: "2", 7: "3"}


def toy_decode(ids: list[int]) -> str:
    out, i = [], 0
    while i < len(ids):
        if ids[i] == 8:
            out.append("é" if i + 1 < len(ids) and ids[i + 1] == 9 else "\ufffd")
            i += 2
            continue
        out.append(VOCAB[ids[i]])
        i += 1
    return "".join(out)


def test_a_tokens_text_ends_where_the_decoded_prefix_through_it_ends():
    assert char_ends([4, 3, 1], toy_decode) == [8, 9, 10]
    # half a character: the prefix through it decodes to one sign, through both halves to "é"
    assert char_ends([1, 8, 9, 2], toy_decode) == [1, 2, 2, 3]


def test_the_repeats_of_a_sentence_loop_are_the_tokens_of_its_later_sayings():
    counting = [1, 2, 3, 1, 2, 3, 1, 2, 3, 6, 2]          # "1. 1. 1. 2."
    assert toy_decode(counting) == "1. 1. 1. 2."
    assert sentence_repeat_positions(counting, toy_decode) == [0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0]
    # "1. Practice.\n2. Practice.\n3. Practice." : the 2nd and 3rd "Practice." and nothing else
    listed = [1, 2, 3, 4, 2, 5, 6, 2, 3, 4, 2, 5, 7, 2, 3, 4, 2]
    marks = sentence_repeat_positions(listed, toy_decode)
    assert [i for i, m in enumerate(marks) if m] == [9, 10, 15, 16]
    assert sentence_repeat_positions([4, 2, 3, 4, 2], toy_decode) == [0] * 5   # twice is no loop


def test_the_guard_reads_sentences_where_it_can_decode_and_token_ngrams_always():
    listed = [1, 2, 3, 4, 2, 5, 6, 2, 3, 4, 2, 5, 7, 2, 3, 4, 2]
    cfg = LoopGuardSettings(ngram=8, repeats=3, unlikely_ngram=4)
    blind, reading = LoopGuard(cfg, 0, [0]), LoopGuard(cfg, 0, [0], toy_decode)
    # no 8-token sequence comes back three times: only the reading guard sees the loop
    assert blind.repeats(listed) is None
    assert reading.repeats(listed) == sentence_repeat_positions(listed, toy_decode)
    # one token over and over, no sentence end: a loop by n-grams, the same repeats either way
    run = [4] * 12
    assert blind.repeats(run) == reading.repeats(run) == repeated_positions(run, 4)
    assert reading.repeats([4, 2, 3, 1, 2]) is None


def test_the_guard_can_push_down_the_start_a_loop_grew_from():
    run = [5, 6] + [4] * 12
    cfg = LoopGuardSettings(ngram=8, repeats=3, unlikely_ngram=4, first=1)
    marks = LoopGuard(cfg, 0, [0], toy_decode).repeats(run)
    assert marks == [1, 0] + repeated_positions(run, 4)[2:] and marks[0] == 1 and any(marks[2:])
    assert LoopGuard(LoopGuardSettings(first=0), 0, [0]).repeats(run)[0] == 0
    # an answer that does not loop has nothing pushed down, its start included
    assert LoopGuard(cfg, 0, [0], toy_decode).repeats([5, 6, 4, 2, 3, 1, 2]) is None


def test_the_memory_hands_out_the_least_checked_contexts_keeps_the_newest_and_round_trips():
    memory = ContextMemory(3)
    memory.note([[1], [2]], seen=[[3]])
    assert memory.recall(2) == [[3], [1]]                 # unchecked first, then the older
    assert memory.recall(5, exclude=[[3]]) == [[1], [2]]
    memory.note([[3], [1]])
    assert memory.recall(3) == [[2], [3], [1]]
    memory.note([], seen=[[4]])                           # a fourth: the longest unnoted goes
    assert sorted(memory.recall(9)) == [[1], [3], [4]]
    again = ContextMemory(3, memory.state())
    assert again.state() == memory.state() and again.recall(3) == memory.recall(3)
    assert ContextMemory(0, memory.state()).recall(3) == []
