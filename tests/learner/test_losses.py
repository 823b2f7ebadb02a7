"""Hand-computed checks of the loss math: clipping both ways, masking, OPD clip, Combined
weights, stale-sample IS, KL, entropy, normalisation and token-mean aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from infra.settings import LossSettings
from learner.losses import (
    _with_tail,
    advantages,
    entropy_from_logits,
    flatness,
    full_kl,
    guided_bins,
    k3_kl,
    micro_batch_loss,
    normalisation_keys,
    RewardWindow,
    normalise_rewards,
    opd_term,
    policy_terms,
    sample_rewards,
    span_starts,
    tempered_bins,
    topk_direction,
    topk_kl,
    unlikelihood,
)
from schemas.methods import METHODS, Signal, method, rule

CFG = LossSettings()  # clip 0.2 / 0.28, opd clip 2.0, tis cap 2.0


def one_token(ratio: float, adv: float, stale: bool = False, behaviour: float = -1.0):
    """A single trained token whose current/behaviour probability ratio is `ratio`."""
    logp = torch.tensor([[behaviour + math.log(ratio)]], requires_grad=True)
    terms = policy_terms(logp, torch.tensor([[behaviour]]), torch.tensor([[adv]]),
                         torch.ones(1, 1), torch.tensor([stale]), CFG)
    terms.loss.sum().backward()
    return float(terms.loss.detach()), float(logp.grad), bool(terms.clipped[0, 0])


def test_ratio_above_upper_clip_with_positive_advantage_is_clipped_and_has_no_gradient():
    loss, grad, clipped = one_token(ratio=1.5, adv=1.0)
    assert loss == pytest.approx(-1.28)
    assert grad == 0.0
    assert clipped


def test_ratio_above_upper_clip_with_negative_advantage_keeps_the_unclipped_gradient():
    # max(-1.5·-1, -1.28·-1) = 1.5: the pessimistic branch is the unclipped one.
    loss, grad, clipped = one_token(ratio=1.5, adv=-1.0)
    assert loss == pytest.approx(1.5)
    assert grad == pytest.approx(1.5)   # d(ρ)/d(logp) = ρ
    assert not clipped


def test_ratio_below_lower_clip():
    loss, grad, clipped = one_token(ratio=0.5, adv=-1.0)   # max(0.5, 0.8) = 0.8, clipped
    assert (loss, grad, clipped) == (pytest.approx(0.8), 0.0, True)
    loss, grad, clipped = one_token(ratio=0.5, adv=1.0)    # max(-0.5, -0.8) = -0.5
    assert (loss, grad, clipped) == (pytest.approx(-0.5), pytest.approx(-0.5), False)


def test_clip_is_asymmetric():
    # 1.25 is inside the upper bound 1.28 but would be outside a symmetric 0.2 clip.
    loss, grad, clipped = one_token(ratio=1.25, adv=1.0)
    assert (loss, grad, clipped) == (pytest.approx(-1.25), pytest.approx(-1.25), False)


def test_stale_sample_uses_truncated_importance_weight_instead_of_the_clip():
    # ρ_behaviour = 3 would be clipped to zero gradient; stale: weight min(3, 2) = 2, ratio 1.
    loss, grad, clipped = one_token(ratio=3.0, adv=1.0, stale=True)
    assert loss == pytest.approx(-2.0)
    assert grad == pytest.approx(-2.0)
    assert not clipped


def test_all_masked_sample_contributes_nothing_and_no_nan_even_with_extreme_values():
    # Sample 0 trains one token; sample 1 is fully masked and holds values whose ratio
    # would overflow exp() if it were not masked out first.
    logp = torch.tensor([[-1.0, 0.0], [0.0, 0.0]], requires_grad=True)
    behaviour = torch.tensor([[-1.0, 0.0], [-200.0, -300.0]])
    adv = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    out = micro_batch_loss(logp, behaviour, adv, mask, torch.tensor([False, False]), 1, CFG)
    out.loss.backward()
    assert float(out.loss) == pytest.approx(-1.0)
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1].abs().sum() == 0
    assert out.sums["tokens"] == 1.0


def test_whole_step_masked_gives_zero_loss_not_nan():
    logp = torch.zeros(1, 3, requires_grad=True)
    out = micro_batch_loss(logp, torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 3),
                           torch.tensor([False]), 0, CFG)
    out.loss.backward()
    assert float(out.loss) == 0.0 and torch.isfinite(logp.grad).all()


def test_token_mean_over_the_step_across_micro_batches():
    # Sample A: 1 token, reward +1. Sample B: 3 tokens, reward -1. ρ = 1 everywhere.
    # Token mean: (1·(-1) + 3·(+1)) / 4 = 0.5, whichever micro-batch each sample is in.
    def part(n_tokens, reward):
        logp = torch.full((1, 3), -0.5)
        mask = torch.tensor([[1.0] * n_tokens + [0.0] * (3 - n_tokens)])
        adv = torch.full((1, 3), reward)
        return micro_batch_loss(logp, logp.clone(), adv, mask, torch.tensor([False]), 4, CFG).loss
    assert float(part(1, 1.0) + part(3, -1.0)) == pytest.approx(0.5)


def test_opd_clip():
    teacher = torch.tensor([[0.5, -1.0, -0.2]])
    behaviour = torch.tensor([[-3.0, 4.0, -0.7]])
    assert opd_term(teacher, behaviour, 2.0).tolist() == [[2.0, -2.0, pytest.approx(0.5)]]


def test_combined_weights_and_no_opd_term_without_teacher():
    cfg = LossSettings(w_rl=0.5, w_opd=2.0)
    rewards = torch.tensor([1.0, 1.0])
    teacher = torch.tensor([[-0.75], [0.0]])
    behaviour = torch.tensor([[-1.0], [-1.0]])
    has_teacher = torch.tensor([1.0, 0.0])
    adv = advantages(rule("combined"), rewards, teacher, behaviour, has_teacher, cfg)
    # 0.5·1 + 2·(−0.75 − (−1)) = 1.0; the second has no teacher: 0.5·1 only.
    assert adv.tolist() == [[1.0], [0.5]]
    assert advantages(rule("rl"), rewards, teacher, behaviour, has_teacher, cfg).tolist() == [[0.5], [0.5]]
    assert advantages(rule("OPD"), rewards, teacher, behaviour, has_teacher, cfg).tolist() == [[0.5], [0.0]]
    with pytest.raises(ValueError, match="unknown training method 'ppo'"):
        rule("ppo")


def test_one_method_table_says_what_each_method_waits_for_and_trains():
    assert {m.value: r.needs for m, r in METHODS.items()} == {
        "RL": {Signal.JUDGEMENT}, "OPD": {Signal.HINT}, "COMBINED": {Signal.JUDGEMENT, Signal.HINT}}
    assert [m.value for m, r in METHODS.items() if r.needs_teacher_logprobs] == ["OPD"]
    assert method(" combined ").value == "COMBINED"


def test_k3_kl_by_hand_and_zero_off_mask():
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25), -500.0]])
    kl = k3_kl(logp, ref, torch.tensor([[1.0, 0.0]]))
    # d = ln 0.5: 0.5 − ln 0.5 − 1 = 0.19315
    assert kl.tolist() == [[pytest.approx(0.5 - math.log(0.5) - 1.0), 0.0]]
    assert float(k3_kl(logp, logp, torch.ones(1, 2)).sum()) == 0.0


def test_full_kl_by_hand_sees_the_tokens_no_sample_took():
    # policy (0.5, 0.25, 0.25), reference (0.25, 0.25, 0.5): KL = 0.5 ln 2 + 0 + 0.25 ln 0.5
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]])) + 3.0   # any shift: logsumexp is taken
    lse = torch.logsumexp(logits, dim=-1)
    ref = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]]))
    assert full_kl(logits, lse, ref).tolist() == [[pytest.approx(0.25 * math.log(2))]]
    assert full_kl(logits, lse, torch.log_softmax(logits, -1)).abs().max() < 1e-6
    # the gradient moves mass off the token the reference finds unlikely, sampled or not
    logits.requires_grad_(True)
    full_kl(logits, torch.logsumexp(logits, -1), ref).sum().backward()
    assert logits.grad[0, 0, 0] > 0 > logits.grad[0, 0, 2]


def test_kl_and_entropy_enter_the_loss_with_their_coefficients():
    cfg = LossSettings(kl_coef=0.1, entropy_coef=0.01)
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    ent = torch.tensor([[math.log(4.0)]])
    out = micro_batch_loss(logp, logp.clone(), torch.zeros(1, 1), torch.ones(1, 1),
                           torch.tensor([False]), 1, cfg, kl=k3_kl(logp, ref, torch.ones(1, 1)), entropy=ent)
    assert float(out.loss) == pytest.approx(0.1 * (0.5 - math.log(0.5) - 1) - 0.01 * math.log(4))


def test_kl_on_negative_counts_only_the_tokens_pushed_down():
    logp = torch.full((1, 3), math.log(0.5))
    kl = torch.tensor([[0.2, 0.3, 0.5]])
    adv = torch.tensor([[1.0, -1.0, 0.0]])
    mask = torch.ones(1, 3)
    stale = torch.tensor([False])
    every = micro_batch_loss(logp, logp.clone(), adv, mask, stale, 3,
                             LossSettings(kl_coef=1.0, kl_on="all"), kl=kl)
    neg = micro_batch_loss(logp, logp.clone(), adv, mask, stale, 3,
                           LossSettings(kl_coef=1.0, kl_on="negative"), kl=kl)
    assert every.sums["kl"] == pytest.approx(1.0)
    assert neg.sums["kl"] == pytest.approx(0.3)
    # ratio 1: the policy term is −A summed over the tokens; the KL adds what it counts
    assert float(every.loss) * 3 == pytest.approx(0.0 + 1.0)
    assert float(neg.loss) * 3 == pytest.approx(0.0 + 0.3)


def test_span_starts_marks_the_first_tokens_of_every_trained_span():
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 0],
                         [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    assert span_starts(mask, 2).tolist() == [[0, 1, 1, 0, 0, 0, 0, 1, 1, 0],
                                             [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert span_starts(mask, 100).tolist() == mask.tolist()


def test_kl_on_start_counts_only_the_first_tokens_of_the_response():
    logp = torch.full((1, 5), math.log(0.5))
    kl = torch.tensor([[9.0, 0.5, 0.25, 0.125, 4.0]])   # position 0 is prompt: off the mask
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])
    adv = torch.zeros(1, 5)
    stale = torch.tensor([False])
    out = micro_batch_loss(logp, logp.clone(), adv, mask, stale, 4,
                           LossSettings(kl_coef=2.0, kl_on="start", kl_start_tokens=2), kl=kl)
    assert out.sums["kl"] == pytest.approx(0.75)
    assert float(out.loss) == pytest.approx(2.0 * 0.75 / 4)


def test_neg_weight_scales_only_the_tokens_pushed_down():
    logp = torch.full((1, 3), math.log(0.5), requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -0.5]])
    mask = torch.ones(1, 3)
    stale = torch.tensor([False])
    grads = []
    for w in (1.0, 0.25, 0.0):
        logp.grad = None
        out = micro_batch_loss(logp, logp.detach().clone(), adv, mask, stale, 3, LossSettings(neg_weight=w))
        out.loss.backward()
        grads.append(logp.grad[0].tolist())
        # ratio 1: the policy loss is −(A scaled) summed over the tokens
        assert out.sums["policy_loss"] == pytest.approx(-1.0 + 1.5 * w)
    # d(−ρA)/dlogp = −A/3 a token: the approved token's pull is the same at every weight
    assert grads[0] == pytest.approx([-1 / 3, 1 / 3, 0.5 / 3])
    assert grads[1] == pytest.approx([-1 / 3, 0.25 / 3, 0.125 / 3])
    assert grads[2] == pytest.approx([-1 / 3, 0.0, 0.0])
    with pytest.raises(ValueError):
        LossSettings(neg_weight=1.5)


def test_flatness_counts_only_where_the_policy_is_less_sure_than_the_base_beyond_the_margin():
    cfg = LossSettings(flat_coef=0.5, flat_margin=0.25)
    ent = torch.tensor([[2.0, 1.0, 3.0, 4.0]], requires_grad=True)
    base = torch.tensor([[1.0, 2.0, 2.9, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    flat = flatness(ent, base, cfg.flat_margin)
    # flatter by 1 (0.75 over the margin), surer, inside the margin, off the mask
    assert flat.tolist() == [[pytest.approx(0.75), 0.0, 0.0, pytest.approx(2.75)]]
    logp = torch.zeros(1, 4)
    out = micro_batch_loss(logp, logp.clone(), torch.zeros(1, 4), mask, torch.tensor([False]), 3, cfg, flat=flat)
    assert float(out.loss.detach()) == pytest.approx(0.5 * 0.75 / 3) and out.sums["flat"] == pytest.approx(0.75)
    out.loss.backward()
    # only the too-flat trained position is pushed towards sureness; the base takes no gradient
    assert ent.grad.tolist() == [[pytest.approx(0.5 / 3), 0.0, 0.0, 0.0]]


def test_entropy_of_uniform_logits():
    assert entropy_from_logits(torch.zeros(1, 2, 4)).tolist() == [[pytest.approx(math.log(4))] * 2]


def test_group_and_step_normalisation():
    rewards = torch.tensor([1.0, -1.0, 1.0, -1.0, 3.0, 0.7])
    groups = ["a", "a", "a", "a", "solo", None]
    keys = normalisation_keys(groups, [0] * 6, "group")
    out = normalise_rewards(rewards, keys)
    # group a: mean 0, std 1; a singleton group has no baseline: 0; no group: untouched.
    assert out.tolist() == [pytest.approx(v, abs=1e-5) for v in (1, -1, 1, -1, 0, 0.7)]
    assert normalisation_keys(["a", "a", None], [0, 1, 0], "step") == [("a", 0), ("a", 1), None]
    assert normalise_rewards(rewards, normalisation_keys(groups, [0] * 6, "none")).equal(rewards)
    with pytest.raises(ValueError, match="unknown advantage normalisation 'episode'"):
        normalisation_keys(groups, [0] * 6, "episode")


def test_batch_normalisation_is_a_mean_baseline_over_the_step():
    # rewards +1, +1, -1, -1 with groups absent: mean 0, std 1; then 3 of 4 satisfied.
    flat = normalise_rewards(torch.tensor([1.0, 1.0, -1.0, -1.0]), normalisation_keys([None] * 4, [None] * 4, "batch"))
    assert flat.tolist() == [pytest.approx(v, abs=1e-5) for v in (1, 1, -1, -1)]
    skew = normalise_rewards(torch.tensor([1.0, 1.0, 1.0, -1.0]), normalisation_keys([None] * 4, [None] * 4, "batch"))
    # mean 0.5, std sqrt(0.75): the satisfied ones get a small push, the miss a large one.
    assert skew.tolist() == [pytest.approx(v, abs=1e-4) for v in (0.57735, 0.57735, 0.57735, -1.73205)]
    # a step where everyone is satisfied carries no RL gradient
    assert normalise_rewards(torch.ones(3), ["batch"] * 3).abs().max() < 1e-5


def test_a_precomputed_advantage_is_taken_as_it_is_and_left_out_of_the_others_normalisation():
    rewards = torch.tensor([1.0, -1.0, 3.0, 0.5])
    advantage = torch.tensor([0.0, 0.0, -1.2247, 0.0])
    has = torch.tensor([0.0, 0.0, 1.0, 0.0])
    got = sample_rewards(rewards, advantage, has, [None] * 4, [None] * 4, "batch")
    # the three without one are normalised among themselves: 1, -1, 0.5
    r = torch.tensor([1.0, -1.0, 0.5])
    z = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    assert got.tolist() == pytest.approx([z[0].item(), z[1].item(), -1.2247, z[2].item()], abs=1e-5)
    none = sample_rewards(rewards, advantage, has, [None] * 4, [None] * 4, "none")
    assert none.tolist() == pytest.approx([1.0, -1.0, -1.2247, 0.5])


def test_running_normalisation_gives_a_step_of_one_verdict_a_signal_from_earlier_steps():
    window = RewardWindow(4)
    none = torch.zeros(2)
    # a first step is normalised like a batch: mean 0.5, std sqrt(0.75)
    first = sample_rewards(torch.tensor([1.0, 1.0, 1.0, -1.0]), none.new_zeros(4), none.new_zeros(4),
                           [None] * 4, [None] * 4, "running", window=window)
    assert first.tolist() == [pytest.approx(v, abs=1e-4) for v in (0.57735, 0.57735, 0.57735, -1.73205)]
    # two approvals: "batch" has no baseline for them, the window does (it now holds 1, -1, 1, 1)
    assert sample_rewards(torch.ones(2), none, none, [None] * 2, [None] * 2, "batch").abs().max() < 1e-5
    approved = sample_rewards(torch.ones(2), none, none, [None] * 2, [None] * 2, "running", window=window)
    assert approved.tolist() == [pytest.approx(0.5 / math.sqrt(0.75), abs=1e-4)] * 2
    assert list(window.values) == [1.0, -1.0, 1.0, 1.0]   # bounded: the oldest went out
    # a precomputed advantage is neither renormalised nor added to the window
    got = sample_rewards(torch.tensor([-1.0, 3.0]), torch.tensor([0.0, 0.7]), torch.tensor([0.0, 1.0]),
                         [None] * 2, [None] * 2, "running", window=window)
    assert got[1].item() == pytest.approx(0.7)
    assert list(window.values) == [-1.0, 1.0, 1.0, -1.0]
    assert got[0].item() == pytest.approx(-1.0, abs=1e-4)   # window mean 0, std 1
    # all the same: no spread, no signal
    assert RewardWindow(3, [1.0, 1.0]).normalise(torch.ones(1)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="needs a RewardWindow"):
        sample_rewards(torch.ones(1), torch.zeros(1), torch.zeros(1), [None], [None], "running")


def _full_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p.exp() * (p - q)).sum(-1)


def test_topk_kl_on_the_whole_vocabulary_is_the_exact_kl_both_ways():
    g = torch.Generator().manual_seed(0)
    student = torch.log_softmax(torch.randn(2, 3, 11, generator=g), -1)
    teacher = torch.log_softmax(torch.randn(2, 3, 11, generator=g), -1)
    ids = teacher.argsort(-1, descending=True)
    valid = torch.ones_like(ids, dtype=torch.bool)
    s, t = student.gather(-1, ids), teacher.gather(-1, ids)
    assert torch.allclose(topk_kl(s, t, valid, "forward"), _full_kl(teacher, student), atol=1e-4)
    assert torch.allclose(topk_kl(s, t, valid, "reverse"), _full_kl(student, teacher), atol=1e-4)


def test_topk_kl_lumps_the_rest_of_the_vocabulary_into_one_bin():
    student = torch.log(torch.tensor([[[0.5, 0.2, 0.2, 0.1]]]))
    teacher = torch.log(torch.tensor([[[0.1, 0.6, 0.1, 0.2]]]))
    ids = torch.tensor([[[1, 3]]])            # the teacher's top 2; tokens 0 and 2 form the tail
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    got = topk_kl(student.gather(-1, ids), teacher.gather(-1, ids), valid, "forward")
    want = 0.6 * math.log(0.6 / 0.2) + 0.2 * math.log(0.2 / 0.1) + 0.2 * math.log(0.2 / 0.7)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_topk_kl_is_zero_and_finite_where_nothing_is_valid():
    s = torch.zeros(1, 2, 3, requires_grad=True)
    t = torch.full((1, 2, 3), -2.0)
    valid = torch.tensor([[[False] * 3, [True, True, False]]])
    kl = topk_kl(s - torch.logsumexp(torch.zeros(5), 0), t, valid, "reverse")
    assert float(kl[0, 0]) == 0.0 and float(kl[0, 1]) > 0
    kl.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, 0].abs().sum() == 0 and s.grad[0, 1, 2] == 0


def test_forward_topk_kl_moves_probability_to_every_token_the_teacher_prefers():
    logits = torch.zeros(1, 1, 6, requires_grad=True)
    teacher = torch.log(torch.tensor([0.5, 0.3]))[None, None]   # tokens 4 and 5; 0.2 elsewhere
    ids = torch.tensor([[[4, 5]]])
    for _ in range(200):
        s = torch.log_softmax(logits, -1).gather(-1, ids)
        kl = topk_kl(s, teacher, torch.ones(1, 1, 2, dtype=torch.bool), "forward")
        grad, = torch.autograd.grad(kl.sum(), logits)
        logits = (logits - 0.5 * grad).detach().requires_grad_(True)
    p = torch.softmax(logits, -1)[0, 0]
    assert float(p[4]) == pytest.approx(0.5, abs=0.01) and float(p[5]) == pytest.approx(0.3, abs=0.01)
    assert float(p[:4].sum()) == pytest.approx(0.2, abs=0.01)


def test_a_tempered_teacher_is_its_softmax_at_that_temperature_over_the_whole_vocabulary():
    g = torch.Generator().manual_seed(3)
    student = torch.log_softmax(torch.randn(1, 4, 9, generator=g), -1)
    teacher = torch.log_softmax(torch.randn(1, 4, 9, generator=g), -1)
    ids = teacher.argsort(-1, descending=True)
    valid = torch.ones_like(ids, dtype=torch.bool)
    s, t = student.gather(-1, ids), teacher.gather(-1, ids)
    sharp = torch.log_softmax(teacher / 0.6, -1)
    assert torch.allclose(topk_kl(s, t, valid, "forward", 0.6), _full_kl(sharp, student), atol=1e-4)
    assert torch.allclose(topk_kl(s, t, valid, "reverse", 0.6), _full_kl(student, sharp), atol=1e-4)
    assert torch.allclose(topk_kl(s, t, valid, "forward", 1.0), _full_kl(teacher, student), atol=1e-4)


def test_the_tail_is_tempered_as_tokens_no_likelier_than_the_last_of_the_top_k():
    top = torch.log(torch.tensor([[0.3, 0.2, 0.1]]))    # the tail holds 0.4, more than any token
    valid = torch.tensor([[True, True, True]])
    bins = tempered_bins(top, valid, 0.5).exp()[0]
    raw = torch.tensor([0.09, 0.04, 0.01, 0.4 * 0.1])   # p², and the tail as four tokens of 0.1
    assert torch.allclose(bins, raw / raw.sum(), atol=1e-6)
    assert float(bins[-1]) < 0.4                         # one bin of 0.4 squared would have grown
    # padding does not count as the least likely token; a row with nothing valid is left alone
    padded = tempered_bins(torch.log(torch.tensor([[0.3, 0.2, 0.1, 0.5]])),
                           torch.tensor([[True, True, True, False]]), 0.5).exp()[0]
    assert torch.allclose(padded[[0, 1, 2, 4]], raw / raw.sum(), atol=1e-6) and float(padded[3]) == 0
    empty = tempered_bins(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool), 0.5).exp()[0]
    assert float(empty[-1]) == pytest.approx(1.0) and float(empty[:3].sum()) == 0


def test_a_forward_kl_to_a_flat_teacher_spreads_the_student_less_at_a_lower_temperature():
    teacher = torch.log(torch.tensor([0.3, 0.2, 0.15, 0.1]))[None, None]   # tokens 0-3; 0.25 elsewhere
    ids = torch.arange(4)[None, None]
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    start = torch.tensor([[[4.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]]])   # sure of token 0
    ends = {}
    for temperature in (1.0, 0.5):
        logits = start.clone().requires_grad_(True)
        for _ in range(300):
            kl = topk_kl(torch.log_softmax(logits, -1).gather(-1, ids), teacher, valid, "forward", temperature)
            grad, = torch.autograd.grad(kl.sum(), logits)
            logits = (logits - 0.5 * grad).detach().requires_grad_(True)
        ends[temperature] = logits
    h = {k: float(entropy_from_logits(v)) for k, v in ends.items()}
    assert h[1.0] > float(entropy_from_logits(start)) + 1.0        # as flat as the teacher
    assert h[0.5] < h[1.0] - 0.25
    for logits in ends.values():                                    # the teacher's order either way
        assert torch.equal(logits[0, 0, :4].argsort(descending=True), torch.arange(4))


def test_a_guided_teacher_moves_each_bin_further_along_the_hints_effect_capped():
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))   # bins: tokens a, b, the tail
    base = torch.log(torch.tensor([[0.25, 0.6, 0.15]]))
    valid = torch.tensor([[True, True]])
    assert torch.equal(guided_bins(teacher, base, valid, 0.0, 1.0), teacher)
    got = guided_bins(teacher, base, valid, 1.0, 5.0).exp()[0]
    raw = torch.tensor([0.5 ** 2 / 0.25, 0.3 ** 2 / 0.6, 0.2 ** 2 / 0.15])   # t · (t / u)
    assert torch.allclose(got, raw / raw.sum(), atol=1e-6)
    # a token the base almost never writes (the hint's own words) is raised by at most e^(g·cap)
    rare = guided_bins(torch.log(torch.tensor([[0.1, 0.5, 0.4]])), torch.log(torch.tensor([[1e-6, 0.5, 0.5]])),
                       valid, 2.0, 0.5).exp()[0]
    raw = torch.tensor([0.1 * math.e, 0.5, 0.4 * (0.4 / 0.5) ** 2])   # the tail's ratio is under the cap
    assert torch.allclose(rare, raw / raw.sum(), atol=1e-6)
    # a row with nothing valid keeps the teacher's bins
    assert torch.equal(guided_bins(teacher, base, torch.tensor([[False, False]]), 1.0, 1.0), teacher)


def test_the_kl_to_a_guided_teacher_is_the_kl_to_its_bins():
    g = torch.Generator().manual_seed(5)
    student, teacher, base = (torch.log_softmax(torch.randn(1, 3, 7, generator=g), -1) for _ in range(3))
    ids = teacher.argsort(-1, descending=True)[..., :4]
    valid = torch.ones_like(ids, dtype=torch.bool)
    s, t, u = (x.gather(-1, ids) for x in (student, teacher, base))
    guided = guided_bins(_with_tail(t, valid), _with_tail(u, valid), valid, 1.5, 0.7)
    got = topk_kl(s, t, valid, "forward", base_top=u, guidance=1.5, cap=0.7)
    assert torch.allclose(got, _full_kl(guided, _with_tail(s, valid)), atol=1e-5)
    assert torch.equal(topk_kl(s, t, valid, "forward", base_top=u, guidance=0.0), topk_kl(s, t, valid, "forward"))
    assert not torch.allclose(got, topk_kl(s, t, valid, "forward"))


def test_a_policy_anchored_guidance_moves_the_policys_own_bins_by_the_hints_effect():
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    base = torch.log(torch.tensor([[0.25, 0.6, 0.15]]))
    policy = torch.log(torch.tensor([[0.1, 0.7, 0.2]]))       # already moved away from the base
    valid = torch.tensor([[True, True]])
    got = guided_bins(teacher, base, valid, 1.0, 5.0, anchor=policy).exp()[0]
    raw = torch.tensor([0.1 * 0.5 / 0.25, 0.7 * 0.3 / 0.6, 0.2 * 0.2 / 0.15])   # π · (t / u)
    assert torch.allclose(got, raw / raw.sum(), atol=1e-6)
    # a policy still at the base gets the teacher itself at g = 1 (the cap not reached) ...
    assert torch.allclose(guided_bins(teacher, base, valid, 1.0, 5.0, anchor=base), teacher, atol=1e-6)
    # ... and a policy past the teacher is not pulled back to it: the target's odds of a over b
    # are the policy's (1/7) times the hint's ratio of them (4), not the teacher's (5/3)
    assert float(got[0] / got[1]) == pytest.approx((0.1 / 0.7) * (0.5 / 0.3) / (0.25 / 0.6), rel=1e-5)
    # the cap bounds the ratio as it does for the teacher
    capped = guided_bins(teacher, base, valid, 2.0, 0.1, anchor=policy).exp()[0]
    raw = torch.tensor([0.1 * math.exp(0.2), 0.7 * math.exp(-0.2), 0.2 * math.exp(0.2)])
    assert torch.allclose(capped, raw / raw.sum(), atol=1e-6)
    # topk_kl takes the anchor on the same K + 1 bins, without its gradient
    g = torch.Generator().manual_seed(7)
    student, t, u = (torch.log_softmax(torch.randn(1, 3, 7, generator=g), -1) for _ in range(3))
    ids = t.argsort(-1, descending=True)[..., :4]
    ok = torch.ones_like(ids, dtype=torch.bool)
    s_top = student.gather(-1, ids).requires_grad_(True)
    t_top, u_top = t.gather(-1, ids), u.gather(-1, ids)
    kl = topk_kl(s_top, t_top, ok, "forward", base_top=u_top, guidance=1.0, cap=5.0, anchor_top=s_top)
    want = guided_bins(_with_tail(t_top, ok), _with_tail(u_top, ok), ok, 1.0, 5.0,
                       anchor=_with_tail(s_top.detach(), ok))
    assert torch.allclose(kl, _full_kl(want, _with_tail(s_top.detach(), ok)), atol=1e-5)
    kl.sum().backward()
    assert s_top.grad is not None and s_top.grad.abs().sum() > 0
    # the policy as anchor means nothing without the hint's effect to move it by
    with pytest.raises(ValueError, match="opd_anchor=policy .* needs loss.opd_guidance > 0"):
        LossSettings(opd_anchor="policy", opd_guidance=0.0)


@pytest.mark.parametrize("given,reward_term,lora,anchor,guidance", [
    ({}, True, True, "policy", 1.0),                     # combined with LoRA: from the policy, g = 1
    ({}, False, True, "teacher", 0.0),                   # opd alone: the teacher as it is
    ({}, True, False, "teacher", 0.0),                   # full weights: the base would be a copy
    ({"opd_anchor": "teacher"}, True, True, "teacher", 0.0),
    ({"opd_anchor": "policy"}, False, False, "policy", 1.0),
    ({"opd_guidance": 2.0}, False, True, "teacher", 2.0),
    ({"opd_guidance": 0.5}, True, True, "policy", 0.5),
    ({"opd_anchor": "teacher", "opd_guidance": 0.0}, True, True, "teacher", 0.0),
])
def test_the_anchor_and_the_guidance_default_by_method_and_by_what_trains(given, reward_term, lora, anchor,
                                                                          guidance):
    got = LossSettings(**given).resolved(reward_term, lora, kl_coef=0.0)
    assert (got.opd_anchor, got.opd_guidance) == (anchor, guidance)
    assert LossSettings(**given, kl_coef=0.3).resolved(reward_term, lora, kl_coef=0.0).kl_coef == 0.3
    assert got.kl_coef == 0.0


def test_opd_form_names_the_direction():
    assert topk_direction("token") is None
    assert topk_direction("topk_forward") == "forward" and topk_direction("topk_reverse") == "reverse"
    with pytest.raises(ValueError, match="unknown opd_form"):
        topk_direction("topk_sideways")


def test_the_distillation_term_enters_the_loss_with_w_opd_over_the_step_tokens():
    cfg = LossSettings(w_opd=0.5, kl_coef=0.0)
    logp = torch.full((1, 3), -1.0)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    distill = torch.tensor([[0.2, 0.4, 9.0]])   # the masked position never counts
    out = micro_batch_loss(logp, logp, torch.zeros(1, 3), mask, torch.tensor([False]), 4, cfg,
                           distill=distill)
    assert float(out.loss) == pytest.approx(0.5 * 0.6 / 4) and out.sums["distill"] == pytest.approx(0.6)


def test_opd_norm_teacher_divides_the_distillation_term_by_the_teacher_samples_tokens():
    """Two of a step's 10 trained tokens belong to a sample with a teacher: "teacher" gives its
    term what OPD alone would (÷ 2), "step" a fifth of that (÷ 10); the rest is unchanged."""
    logp = torch.full((1, 3), -1.0)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    distill = torch.tensor([[0.2, 0.4, 9.0]])

    def loss(norm: str, **kw) -> float:
        cfg = LossSettings(w_opd=0.5, kl_coef=0.0, opd_norm=norm)
        return float(micro_batch_loss(logp, logp, adv, mask, torch.tensor([False]), 10, cfg,
                                      distill=distill, **kw).loss)

    policy = -2.0 / 10                                  # ratio 1, advantage 1, two tokens
    assert loss("step", distill_tokens=2) == pytest.approx(policy + 0.5 * 0.6 / 10)
    assert loss("teacher", distill_tokens=2) == pytest.approx(policy + 0.5 * 0.6 / 2)
    assert loss("teacher") == pytest.approx(loss("step"))   # no count given: the step's


def test_a_stale_sample_takes_the_proximal_policy_it_is_given():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    behaviour, adv, mask, stale = torch.tensor([[-1.5]]), torch.tensor([[1.0]]), torch.ones(1, 1), torch.tensor([True])
    now = policy_terms(logp, behaviour, adv, mask, stale, CFG)
    assert float(now.ratio) == pytest.approx(1.0) and float(now.is_weight) == pytest.approx(min(math.exp(0.5), 2.0))
    # a later epoch: the proximal policy is the first pass's (−1.2), the weights have moved to −1.0
    later = policy_terms(logp, behaviour, adv, mask, stale, CFG, proximal_logp=torch.tensor([[-1.2]]))
    assert float(later.ratio) == pytest.approx(math.exp(0.2)) and float(later.is_weight) == pytest.approx(math.exp(0.3))
    beyond = policy_terms(logp, behaviour, adv, mask, stale, CFG, proximal_logp=torch.tensor([[-1.5]]))
    assert bool(beyond.clipped[0, 0])   # ratio e^0.5 > 1.28 with a positive advantage


def test_unlikelihood_is_minus_log_one_minus_p_on_the_marked_tokens_and_stays_finite():
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.0, 0.2]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    ul = unlikelihood(logp, mask)
    assert ul[0, 0].item() == pytest.approx(math.log(2))
    assert ul[0, 1].item() == pytest.approx(-math.log(0.1), rel=1e-5)
    assert torch.isfinite(ul).all() and ul[0, 2].item() > 10   # p = 1: large, not inf
    assert ul[0, 3].item() == 0
    # its gradient pushes the marked token's logprob down
    x = logp.clone().requires_grad_(True)
    unlikelihood(x, mask)[0, :2].sum().backward()
    assert (x.grad[0, :2] > 0).all() and x.grad[0, 3] == 0
