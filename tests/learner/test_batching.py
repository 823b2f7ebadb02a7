"""Validation, packing by token budget, step collection, collation alignment, staleness."""

from __future__ import annotations

import pytest
import torch

from learner.batching import InvalidSample, StepCollector, collate, has_signal, pack, validate
from learner.staleness import StalenessCounter, Verdict, lag, policy
from schemas.events import Method
from schemas.methods import rule
from tests.learner.samples import make_sample


def test_validate_names_the_mismatch():
    good = make_sample(1)
    validate(good)
    bad = good.model_copy(update={"behaviour_logprobs": [-1.0]})
    with pytest.raises(InvalidSample, match="has 3 response tokens but 1 behaviour_logprobs"):
        validate(bad)
    # no teacher logprobs is well formed: an opd run skips it, it is not a bad record
    assert good.teacher_logprobs is None and not has_signal(good, rule("opd"))
    assert has_signal(good, rule("combined")) and has_signal(good, rule("rl"))
    with pytest.raises(InvalidSample, match="empty prompt"):
        validate(good.model_copy(update={"prompt_token_ids": []}))


def test_a_precomputed_advantage_of_zero_or_over_no_token_carries_no_signal():
    step = make_sample(2).model_copy(update={"advantage": 0.7, "task_group": "g", "step_index": 0})
    assert has_signal(step, rule("rl")) and has_signal(step, rule("combined"))
    zero = step.model_copy(update={"advantage": 0.0})                   # a group of equal outcomes
    dropped = step.model_copy(update={"loss_mask": [0] * len(step.loss_mask)})   # a dropped bucket
    assert not any(has_signal(s, rule(m)) for s in (zero, dropped) for m in ("rl", "combined"))
    taught = zero.model_copy(update={"teacher_logprobs": [-0.1] * len(zero.response_token_ids)})
    assert has_signal(taught, rule("combined")) and not has_signal(taught, rule("rl"))


def test_a_revision_trains_where_the_method_has_a_reward_term_and_revisions_are_on():
    rev = make_sample(3).model_copy(update={"advantage": 1.0, "normaliser": "revision", "revision_of": "a"})
    assert has_signal(rev, rule("rl")) and has_signal(rev, rule("combined"))
    assert not has_signal(rev, rule("opd"))                      # no teacher logprobs: nothing for opd
    assert not any(has_signal(rev, rule(m), revisions=False) for m in ("rl", "combined"))
    assert collate([rev, make_sample(4)], 0).revision.tolist() == [True, False]


def test_a_teachers_own_answer_trains_unless_its_weight_is_zero_whatever_revisions_say():
    answer = make_sample(3).model_copy(update={"advantage": 1.0, "normaliser": "teacher", "revision_of": "a",
                                               "reward": 0.0})
    assert has_signal(answer, rule("rl")) and has_signal(answer, rule("combined"), revisions=False)
    assert not has_signal(answer, rule("opd"))
    assert not any(has_signal(answer, rule(m), teacher_answers=0.0) for m in ("rl", "combined"))
    rev = answer.model_copy(update={"normaliser": "revision"})
    assert has_signal(rev, rule("combined"), teacher_answers=0.0)   # a revision is not the teacher's
    batch = collate([answer, rev, make_sample(4)], 0)
    assert batch.answer.tolist() == [True, False, False] and batch.revision.tolist() == [True, True, False]


def test_pack_respects_padded_budget_and_keeps_order():
    samples = [make_sample(i, prompt_len=3, response_len=2) for i in range(5)]  # 5 tokens each
    batches = pack(samples, token_budget=10)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [s.event_id for b in batches for s in b] == [s.event_id for s in samples]
    # A sample over budget on its own gets its own micro-batch, uncut.
    long = make_sample(9, prompt_len=20, response_len=5)
    assert [len(b) for b in pack([samples[0], long, samples[1]], 10)] == [1, 1, 1]


def test_step_collector_refuses_what_would_need_one_more_micro_batch():
    c = StepCollector.empty(token_budget=10, grad_accum=2)
    samples = [make_sample(i, prompt_len=3, response_len=2) for i in range(5)]
    assert [c.add(s) for s in samples[:4]] == [True] * 4
    assert c.full()
    assert not c.add(samples[4])
    assert len(c.samples) == 4 and len(c.micro_batches()) == 2


def test_collate_aligns_response_to_targets_and_pads():
    a = make_sample(1, prompt_len=2, response_len=3, loss_mask=[1, 0, 1], teacher=True)
    b = make_sample(2, prompt_len=3, response_len=1, reward=-1.0)
    batch = collate([a, b], pad_id=7, stale=[False, True])
    assert batch.input_ids.shape == (2, 5)
    assert batch.input_ids[1, :4].tolist() == [*b.prompt_token_ids, *b.response_token_ids]
    assert batch.input_ids[1, 4].item() == 7
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # Response token i of a sample with prompt length P is predicted at position P-1+i.
    assert batch.mask[0].tolist() == [0, 1, 0, 1]
    assert batch.mask[1].tolist() == [0, 0, 1, 0]
    assert batch.behaviour[0, 1:4].tolist() == pytest.approx(a.behaviour_logprobs)
    assert batch.teacher[0, 1:4].tolist() == [-5.0] * 3 and batch.teacher[1].abs().sum() == 0
    assert batch.has_teacher.tolist() == [1.0, 0.0]
    assert batch.rewards.tolist() == [1.0, -1.0] and batch.stale.tolist() == [False, True]


def test_staleness_policies_and_histogram():
    counter = StalenessCounter()
    drop, correct = policy("drop"), policy("correct")
    assert counter.judge(drop, 10, 8, max_staleness=2) is Verdict.TRAIN
    assert counter.judge(drop, 10, 7, max_staleness=2) is Verdict.DROP
    assert counter.judge(correct, 10, 1, max_staleness=2) is Verdict.CORRECT
    assert counter.judge(correct, 3, 5, max_staleness=0) is Verdict.TRAIN  # newer than us: lag 0
    assert lag(3, 5) == 0
    assert counter.verdicts == {Verdict.TRAIN: 2, Verdict.DROP: 1, Verdict.CORRECT: 1}
    assert counter.histogram() == {"lag_le_0": 1, "lag_le_1": 0, "lag_le_2": 1, "lag_le_4": 1,
                                   "lag_le_8": 0, "lag_gt_8": 1}
    with pytest.raises(ValueError, match="unknown staleness policy 'keep'"):
        policy("keep")


def test_methods_in_samples_are_plain_enums():
    assert make_sample(1, method=Method.OPD, teacher=True).method is Method.OPD


def test_collate_places_the_teacher_top_k_rows_at_the_response_targets():
    a = make_sample(1, prompt_len=2, response_len=3, teacher=True, top_k=4)
    b = make_sample(2, prompt_len=3, response_len=1, teacher=True)          # logprobs, no rows
    batch = collate([a, b], pad_id=0)
    assert batch.top_ids.shape == (2, 4, 4) and batch.has_top.tolist() == [1.0, 0.0]
    rows = torch.tensor(a.teacher_top_ids).view(3, 4)
    assert torch.equal(batch.top_ids[0, 1:4], rows)
    assert batch.top_logprobs[0, 1:4].flatten().tolist() == pytest.approx(a.teacher_top_logprobs)
    assert batch.top_valid[0].sum(-1).tolist() == [0, 4, 4, 4] and not batch.top_valid[1].any()
    none = collate([b], pad_id=0)
    assert none.top_ids.shape == (1, 3, 0) and none.has_top.tolist() == [0.0]


def test_teacher_top_k_rows_that_do_not_fit_the_response_are_named():
    good = make_sample(1, response_len=3, teacher=True, top_k=2)
    assert good.teacher_top_k == 2 and good.problem() is None
    for update, says in [({"teacher_top_ids": good.teacher_top_ids[:-1]}, "5 teacher top-K ids but 6"),
                         ({"teacher_top_ids": good.teacher_top_ids[:-2],
                           "teacher_top_logprobs": good.teacher_top_logprobs[:-2]}, "not K ≥ 1 for each"),
                         ({"teacher_top_logprobs": None}, "ids without the other"),
                         ({"teacher_top_ids": [-1] * 6}, "negative"),
                         ({"teacher_top_logprobs": [0.5] * 6}, "above 0")]:
        bad = good.model_copy(update=update)
        with pytest.raises(InvalidSample, match=says):
            validate(bad)


def test_a_token_id_outside_the_models_vocabulary_is_invalid_not_a_failed_step():
    ok = make_sample(1, teacher=True, top_k=2, vocab=50)
    validate(ok, vocab_size=50)
    validate(ok)   # without a vocabulary only the shapes are checked
    for field in ("prompt_token_ids", "response_token_ids", "teacher_top_ids"):
        bad = ok.model_copy(update={field: [*getattr(ok, field)[:-1], 50]})
        with pytest.raises(InvalidSample, match=f"{field} outside the model's vocabulary of 50"):
            validate(bad, vocab_size=50)
