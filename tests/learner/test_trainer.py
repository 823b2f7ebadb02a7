"""The DeepSpeed trainer on the tiny model, on CPU: rewards move logprobs the right way, the
checkpoint layout is what serving expects, and save/restore resumes training exactly
(weights, optimizer and scheduler), for LoRA and full fine-tuning under ZeRO 0 and 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from infra.errors import LearnerError
from infra.settings import LearnerSettings, LoopGuardSettings, LossSettings
from learner.batching import collate
from learner.loop_guard import LoopGuard, loops, repeated_positions
from learner.losses import RewardWindow, balanced_weights, span_starts, topk_kl
from learner.trainer import Trainer
from tests.learner.samples import make_sample

pytestmark = pytest.mark.slow  # DeepSpeed import and engine setup: a few seconds each


def settings(**kw) -> LearnerSettings:
    # the loop guard off unless a test turns it on: the tiny random model's greedy answers all
    # loop, and its term would move every step these tests compute by hand
    base = dict(device="cpu", lr=5e-2, lora=True, lora_rank=4, lora_alpha=8, token_budget=64, adv_norm="none",
                loop_guard=LoopGuardSettings(prompts=0))
    return LearnerSettings(**{**base, **kw})


def response_logprob(trainer: Trainer, sample) -> float:
    batch = collate([sample], trainer.pad_id)
    with torch.no_grad():
        logp = trainer._token_logprobs(*trainer._logits(trainer.engine, batch), batch)
    return float((logp * batch.mask).sum())


@pytest.mark.parametrize("reward", [1.0, -1.0])
def test_reward_sign_moves_the_response_logprob(tiny_model_dir, reward):
    trainer = Trainer(settings(method="rl"), tiny_model_dir)
    sample = make_sample(3, reward=reward)
    # Behaviour logprobs equal to the current ones make ρ = 1 on the first step.
    before = response_logprob(trainer, sample)
    batch = collate([sample], trainer.pad_id)
    with torch.no_grad():
        own = trainer._token_logprobs(*trainer._logits(trainer.engine, batch), batch)
    sample = sample.model_copy(update={"behaviour_logprobs": own[0, 3:6].tolist()})
    metrics = trainer.train_step([collate([sample], trainer.pad_id)])
    after = response_logprob(trainer, sample)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["reward_mean"] == reward and metrics["trained_tokens"] == 3
    assert (after - before) * reward > 0


def test_opd_pulls_towards_the_teacher(tiny_model_dir):
    trainer = Trainer(settings(method="opd"), tiny_model_dir)
    sample = make_sample(4, teacher=True)   # teacher −5.0 above behaviour ≈ −5.5: positive advantage
    before = response_logprob(trainer, sample)
    metrics = trainer.train_step([collate([sample], trainer.pad_id)])
    assert metrics["adv_mean"] > 0
    assert response_logprob(trainer, sample) > before


@pytest.mark.parametrize("form", ["topk_forward", "topk_reverse"])
def test_topk_distillation_pulls_the_policy_towards_the_teachers_distribution(tiny_model_dir, form):
    trainer = Trainer(settings(method="opd", lr=1e-2, loss=LossSettings(opd_form=form, kl_coef=0.0)),
                      tiny_model_dir)
    sample = make_sample(4, teacher=True, top_k=4)   # the teacher's first choice holds 0.61 of the mass
    first = torch.tensor(sample.teacher_top_ids).view(3, 4)[:, 0]

    def first_choice_logprob() -> float:
        batch = collate([sample], trainer.pad_id)
        with torch.no_grad():
            logits, start = trainer._logits(trainer.engine, batch)
        rows = torch.log_softmax(logits[0, 3 - start:6 - start], -1)
        return float(rows.gather(-1, first[:, None]).sum())

    before = first_choice_logprob()
    steps = [trainer.train_step([collate([sample], trainer.pad_id)]) for _ in range(4)]
    # the sampled-token gap is not used beside the KL: an OPD sample has no other advantage
    assert all(m["adv_mean"] == 0 and m["adv_std"] == 0 for m in steps)
    assert steps[-1]["distill_kl"] < steps[0]["distill_kl"]
    assert first_choice_logprob() > before


def test_opd_norm_teacher_gives_the_teacher_term_its_opd_weight_in_a_mixed_step(tiny_model_dir):
    """One hinted sample among four (the others rewarded 0: no reward signal): with "teacher"
    the step's loss and gradient are what OPD alone gives on the hinted sample by itself; with
    "step" both are diluted by the hinted sample's share (3 of 12 trained tokens)."""
    hinted = make_sample(7, reward=0.0, teacher=True, top_k=4)
    others = [make_sample(8 + i, reward=0.0) for i in range(3)]

    def first_step(method: str, norm: str, samples: list) -> dict[str, float]:
        trainer = Trainer(settings(method=method, loss=LossSettings(kl_coef=0.0, opd_norm=norm, opd_anchor="teacher")), tiny_model_dir)
        return trainer.train_step([collate(samples, trainer.pad_id)])

    alone = first_step("opd", "step", [hinted])
    taught = first_step("combined", "teacher", [hinted, *others])
    diluted = first_step("combined", "step", [hinted, *others])
    assert taught["trained_tokens"] == 4 * alone["trained_tokens"] == 12
    assert taught["teacher_tokens"] == diluted["teacher_tokens"] == alone["teacher_tokens"] == 3
    assert taught["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert taught["grad_norm"] == pytest.approx(alone["grad_norm"], rel=1e-4)
    assert diluted["loss"] == pytest.approx(alone["loss"] / 4, rel=1e-5)
    assert diluted["grad_norm"] == pytest.approx(alone["grad_norm"] / 4, rel=1e-4)


def test_the_teacher_term_takes_the_teacher_at_the_configured_temperature(tiny_model_dir):
    sample = make_sample(4, teacher=True, top_k=4)
    batch = collate([sample], 0)
    got = {}
    for temperature in (1.0, 0.5):
        trainer = Trainer(settings(method="opd", loss=LossSettings(opd_temperature=temperature, kl_coef=0.0)),
                          tiny_model_dir)
        with torch.no_grad():
            logits, start = trainer._logits(trainer.engine, batch)
            lse = torch.logsumexp(logits, -1)
            got[temperature] = trainer._distill(logits, lse, start, batch)
            ids, valid = batch.top_ids[:, start:], batch.top_valid[:, start:]
            want = topk_kl(logits.gather(-1, ids) - lse.unsqueeze(-1), batch.top_logprobs[:, start:], valid,
                           "forward", temperature)
        assert torch.allclose(got[temperature][:, start:], want)
    trained = batch.mask > 0
    assert not torch.allclose(got[0.5][trained], got[1.0][trained])
    # tempered at each response's first two tokens only, as at 1 after them
    trainer = Trainer(settings(method="opd", loss=LossSettings(opd_temperature=0.5, opd_temperature_tokens=2,
                                                               kl_coef=0.0)), tiny_model_dir)
    with torch.no_grad():
        logits, start = trainer._logits(trainer.engine, batch)
        first = trainer._distill(logits, torch.logsumexp(logits, -1), start, batch)
    head = span_starts(batch.mask, 2).bool()
    assert int(head.sum()) == 2 and int(trained.sum()) > 2
    assert torch.allclose(first[head], got[0.5][head]) and torch.allclose(first[~head], got[1.0][~head])
    assert not torch.allclose(first[head], got[1.0][head])


@pytest.mark.parametrize("lora", [True, False])
def test_a_guided_teacher_term_takes_the_base_once_a_step_and_aims_past_the_teacher(tiny_model_dir, monkeypatch, lora):
    """With loss.opd_guidance the teacher's bins are moved along their log-ratio to the base's
    in the student's context: the base (adapter off, or the frozen copy) is taken once per
    micro-batch on a step's first pass, and the step trains differently from the plain term."""
    batches = lambda pad: [collate([make_sample(4, teacher=True, top_k=4)], pad),
                           collate([make_sample(5, teacher=True, top_k=4)], pad)]
    weights = {}
    for guidance in (0.0, 2.0):
        trainer = Trainer(settings(method="opd", lora=lora, lr=1e-2, epochs=3,
                                   loss=LossSettings(kl_coef=0.0, opd_guidance=guidance)), tiny_model_dir)
        assert (trainer.ref_model is not None) == (not lora and guidance > 0)
        calls = []
        taken = trainer._base_logits
        monkeypatch.setattr(trainer, "_base_logits", lambda *a: calls.append(1) or taken(*a))
        batch = batches(trainer.pad_id)[0].to(trainer.device)
        with torch.no_grad():
            logits, start = trainer._logits(trainer.engine, batch)
            lse = torch.logsumexp(logits, -1)
            guide = trainer._guide(batch, start, logits, lse)
            got = trainer._distill(logits, lse, start, batch, guide)
        if guidance:
            ids, valid = batch.top_ids[:, start:], batch.top_valid[:, start:]
            assert guide.anchor_top is None
            want = topk_kl(logits.gather(-1, ids) - lse.unsqueeze(-1), batch.top_logprobs[:, start:], valid,
                           "forward", base_top=guide.base_top, guidance=guidance, cap=1.0)
            assert torch.allclose(got[:, start:], want)
        else:
            assert guide is None
        calls.clear()
        trainer.train_step(batches(trainer.pad_id))
        assert len(calls) == (2 if guidance else 0)   # micro-batches, not × passes
        weights[guidance] = _trainable(trainer)
    assert any(not torch.allclose(weights[0.0][n], weights[2.0][n]) for n in weights[0.0])


def test_a_policy_anchored_teacher_term_is_the_teacher_until_the_policy_moves(tiny_model_dir):
    """loss.opd_anchor=policy at g = 1: with LoRA the policy starts as the base, so its target
    (the policy times the teacher's ratio to the base) is the teacher and the first step trains
    as the plain term does; once the weights moved, the target is the moved policy's, taken on
    the step's first pass and kept for the later ones."""
    batches = lambda pad: [collate([make_sample(4, teacher=True, top_k=4)], pad)]
    loss = dict(kl_coef=0.0, opd_guidance_cap=50.0)
    runs = {}
    for name, extra in (("plain", {}), ("anchored", dict(opd_guidance=1.0, opd_anchor="policy"))):
        trainer = Trainer(settings(method="opd", lr=1e-2, epochs=3, loss=LossSettings(**loss, **extra)),
                          tiny_model_dir)
        first = trainer.train_step(batches(trainer.pad_id))
        after_one = _trainable(trainer)
        kept = []
        if name == "anchored":
            taken = trainer._guide
            trainer._guide = lambda *a: kept.append(taken(*a)) or kept[-1]
        second = trainer.train_step(batches(trainer.pad_id))
        runs[name] = (first, after_one, second, _trainable(trainer), kept, trainer)
    plain, anchored = runs["plain"], runs["anchored"]
    assert anchored[0]["distill_kl"] == pytest.approx(plain[0]["distill_kl"], rel=1e-4)
    assert all(torch.allclose(plain[1][n], anchored[1][n], atol=1e-6) for n in plain[1])
    assert any(not torch.allclose(plain[3][n], anchored[3][n], atol=1e-5) for n in plain[3])
    # the second step's anchor: taken once (one micro-batch), the policy after the first step
    kept, trainer = anchored[4], anchored[5]
    assert len(kept) == 1 and kept[0].anchor_top is not None and not kept[0].anchor_top.requires_grad
    batch = batches(trainer.pad_id)[0].to(trainer.device)
    with torch.no_grad():
        for n, p in trainer.engine.module.named_parameters():
            if n in anchored[1]:
                p.copy_(anchored[1][n])
        logits, start = trainer._logits(trainer.engine, batch)
        own = logits.gather(-1, batch.top_ids[:, start:]) - torch.logsumexp(logits, -1, keepdim=True)
    assert torch.allclose(kept[0].anchor_top, own, atol=1e-5)


def test_combined_aims_at_the_policy_by_default_where_the_base_comes_free(tiny_model_dir):
    """By default `combined` with LoRA takes the hint's effect from the policy (the base is the
    adapter switched off); with full weights it keeps the teacher and loads no second copy."""
    lora = Trainer(settings(method="combined", lora=True), tiny_model_dir)
    assert (lora.loss_cfg.opd_anchor, lora.loss_cfg.opd_guidance) == ("policy", 1.0) and lora._guided()
    full = Trainer(settings(method="combined", lora=False), tiny_model_dir)
    assert (full.loss_cfg.opd_anchor, full.loss_cfg.opd_guidance) == ("teacher", 0.0)
    assert full.ref_model is None and not full._guided()
    opd = Trainer(settings(method="opd", lora=True), tiny_model_dir)
    assert (opd.loss_cfg.opd_anchor, opd.loss_cfg.opd_guidance) == ("teacher", 0.0)


def repeat_logprob(trainer: Trainer, prompt: list[int], answer: list[int], repeats: torch.Tensor) -> float:
    """The policy's mean logprob of the tokens of `answer` marked in `repeats` (bool, one per token)."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = trainer.engine.module(input_ids=ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    return float(logp.gather(-1, ids[0, len(prompt):, None]).squeeze(-1)[repeats].mean())


def test_the_loop_guard_pushes_down_the_repeats_of_the_policys_own_looping_greedy_answer(tiny_model_dir):
    """The tiny random model's greedy answers repeat one token: the guard finds them and the
    step lowers those repeats' probability, beside what the sample itself trains."""
    sample = make_sample(3, reward=1.0)
    guard = LoopGuardSettings(max_new_tokens=24, starts=0)
    moved, answers = {}, {}
    for on in (True, False):
        trainer = Trainer(settings(method="rl", lr=1e-2, loop_guard=guard if on else guard.model_copy(update={"prompts": 0})),
                          tiny_model_dir)
        prompt = list(sample.prompt_token_ids)
        answer = trainer.loop_guard.answer(trainer.engine.module, [prompt], trainer.device)[0]
        assert loops(answer, guard.ngram, guard.repeats)
        repeats = torch.tensor(repeated_positions(answer, guard.unlikely_ngram), dtype=torch.bool)

        before = repeat_logprob(trainer, prompt, answer, repeats)
        metrics = trainer.train_step([collate([sample], trainer.pad_id)])
        moved[on], answers[on] = repeat_logprob(trainer, prompt, answer, repeats) - before, answer
        if on:
            assert metrics["loop_guard_answers"] == 1 and metrics["loop_guard_loops"] == 1
            assert metrics["unlikely_tokens"] == float(repeats.sum()) > 0
            assert metrics["unlikelihood"] > 0 and metrics["loop_guard_s"] > 0
        else:
            assert not any(k.startswith(("loop_guard", "unlikel")) for k in metrics)
    assert answers[True] == answers[False]   # the same weights answer the same
    assert moved[True] < moved[False] and moved[True] < 0


def test_the_loop_guard_also_follows_the_first_tokens_nearly_as_likely_as_the_greedy_one(tiny_model_dir):
    """Loops began where the first-token distribution had flattened and an update moved the
    greedy start to a rival: the guard also answers greedily from each rival start (at least
    `start_ratio` as likely as the greedy first token, `starts` of them, never end-of-sequence)
    and pushes down the repeats of those answers too."""
    sample = make_sample(3, reward=1.0)
    prompt = list(sample.prompt_token_ids)
    cfg = LoopGuardSettings(max_new_tokens=12, starts=2, start_ratio=1e-6)
    trainer = Trainer(settings(method="rl", lr=1e-2, loop_guard=cfg), tiny_model_dir)
    guard, module, device = trainer.loop_guard, trainer.engine.module, trainer.device
    greedy, first = guard._greedy(module, [prompt], 12, device, first=True)
    ranked = first[0].argsort(descending=True).tolist()
    rivals = [t for t in ranked[1:] if t not in guard.eos_ids][:2]
    pairs = guard.answers(module, [prompt], device)
    assert pairs[0] == (prompt, greedy[0])
    assert [ctx for ctx, _ in pairs] == [prompt] * 3            # the start belongs to the answer
    assert [a[0] for _, a in pairs[1:]] == rivals
    rest, _ = guard._greedy(module, [prompt + [t] for t in rivals], 11, device)
    assert [a[1:] for _, a in pairs[1:]] == rest
    # only a start at least as likely as the greedy one: none on a random model (no ties)
    strict = LoopGuard(cfg.model_copy(update={"start_ratio": 1.0}), guard.pad_id, guard.eos_ids)
    assert strict.answers(module, [prompt], device) == pairs[:1]
    # the step pushes down the repeats of every looping answer, the rivals' included
    expected = sum(sum(guard.repeats(a) or []) for _, a in pairs)
    assert expected > sum(guard.repeats(greedy[0]) or [])
    metrics = trainer.train_step([collate([sample], trainer.pad_id)])
    assert (metrics["loop_guard_answers"], metrics["loop_guard_starts"]) == (1, 2)
    assert metrics["unlikely_tokens"] == expected


def test_the_loop_guard_can_check_the_updated_weights_and_repair_them_before_they_are_published(tiny_model_dir):
    """With `after`, the step's prompts are answered again by the updated weights; while they
    loop, one more pass of the step pushes their repeats down (up to `after` passes), and a
    recheck that finds nothing ends the repair."""
    sample = make_sample(3, reward=1.0)
    prompt = list(sample.prompt_token_ids)
    guard = LoopGuardSettings(max_new_tokens=24, starts=0)
    moved = {}
    for after in (0, 2):
        trainer = Trainer(settings(method="rl", lr=1e-2, loop_guard=guard.model_copy(update={"after": after})),
                          tiny_model_dir)
        answer = trainer.loop_guard.answer(trainer.engine.module, [prompt], trainer.device)[0]
        repeats = torch.tensor(repeated_positions(answer, guard.unlikely_ngram), dtype=torch.bool)
        recheck = trainer.loop_guard.recheck
        calls: list[list[list[int]]] = []

        def spy(module, prompts, device, recheck=recheck, calls=calls):
            calls.append(prompts)
            return recheck(module, prompts, device)

        trainer.loop_guard.recheck = spy

        before = repeat_logprob(trainer, prompt, answer, repeats)
        metrics = trainer.train_step([collate([sample], trainer.pad_id)])
        moved[after] = repeat_logprob(trainer, prompt, answer, repeats) - before
        if after:
            # the tiny random model still loops after each update: two more passes, each rechecked
            assert calls == [[prompt]] * 3
            assert (metrics["loop_guard_after_loops"], metrics["loop_guard_repairs"],
                    metrics["loop_guard_left_loops"]) == (1, 2, 1)
            assert trainer.engine.global_steps == trainer.epochs + 2
        else:
            assert calls == [] and "loop_guard_repairs" not in metrics
            assert trainer.engine.global_steps == trainer.epochs
    assert moved[2] < moved[0] < 0

    # weights that answer without a loop after the step are published as they are
    trainer = Trainer(settings(method="rl", lr=1e-2, loop_guard=guard.model_copy(update={"after": 2})), tiny_model_dir)
    recheck = trainer.loop_guard.recheck

    def clean(module, prompts, device):
        _, m = recheck(module, prompts, device)
        return None, {**m, "loop_guard_loops": 0.0}

    trainer.loop_guard.recheck = clean
    metrics = trainer.train_step([collate([sample], trainer.pad_id)])
    assert (metrics["loop_guard_after_loops"], metrics["loop_guard_repairs"], metrics["loop_guard_left_loops"]) == (0, 0, 0)
    assert trainer.engine.global_steps == trainer.epochs


def test_epochs_train_the_same_samples_again_within_the_clip(tiny_model_dir):
    moved = {}
    for epochs in (1, 3):
        trainer = Trainer(settings(method="rl", lr=1e-2, epochs=epochs), tiny_model_dir)
        sample = make_sample(3, reward=1.0)
        batch = collate([sample], trainer.pad_id)
        with torch.no_grad():
            own = trainer._token_logprobs(*trainer._logits(trainer.engine, batch), batch)
        sample = sample.model_copy(update={"behaviour_logprobs": own[0, 3:6].tolist()})
        before = response_logprob(trainer, sample)
        metrics = trainer.train_step([collate([sample], trainer.pad_id)])
        moved[epochs] = response_logprob(trainer, sample) - before
        assert trainer.engine.global_steps == epochs
        assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)   # the first pass's policy
        if epochs > 1:
            assert metrics["epochs"] == 3 and metrics["last_ratio_mean"] > 1.0
    assert moved[3] > moved[1] > 0


def test_the_step_reports_its_gradient_norm_before_the_clip(tiny_model_dir):
    """DeepSpeed keeps no norm of fp32 gradients it clips itself: the trainer's is the norm of
    the loss's gradient, before a clip far below it."""
    trainer = Trainer(settings(method="rl", grad_clip=1e-6, epochs=2), tiny_model_dir)
    sample = make_sample(3, reward=1.0)
    batch = collate([sample], trainer.pad_id)
    twin = copy.deepcopy(trainer.engine.module)   # DeepSpeed's engine only takes its own backward
    params = [p for p in twin.parameters() if p.requires_grad]
    logp = trainer._token_logprobs(*trainer._logits(twin, batch), batch)
    # ρ = 1 with these behaviour logprobs, so the surrogate's gradient is that of −mean logp
    grads = torch.autograd.grad(-(logp * batch.mask).sum() / batch.mask.sum(), params)
    expected = float(torch.nn.utils.get_total_norm(grads))
    sample = sample.model_copy(update={"behaviour_logprobs": logp[0, 3:6].detach().tolist()})
    metrics = trainer.train_step([collate([sample], trainer.pad_id)])
    assert expected > 1e-3
    assert metrics["grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert metrics["last_grad_norm"] > 0 and metrics["last_grad_norm"] != metrics["grad_norm"]


def test_a_revision_trains_as_if_sampled_by_the_policy_now_whatever_its_behaviour_logprobs(tiny_model_dir):
    """A hindsight revision's tokens were sampled under another context, so its recorded
    logprobs say nothing about this prompt. Its first pass has ρ = 1 and no importance weight:
    the gradient of −advantage·mean logp. Taken as a plain sample instead, behaviour logprobs
    of −30 would make ρ huge and the clip would zero its gradient."""
    # no KL to the base: the gradient below is the reward term's alone
    no_kl = LossSettings(kl_coef=0.0)
    trainer = Trainer(settings(method="combined", grad_clip=1e-6, adv_norm="batch", loss=no_kl), tiny_model_dir)
    sample = make_sample(5, reward=1.0).model_copy(update={
        "behaviour_logprobs": [-30.0] * 3, "advantage": 1.0, "normaliser": "revision", "revision_of": "a"})
    batch = collate([sample], trainer.pad_id)
    assert batch.revision.tolist() == [True]
    twin = copy.deepcopy(trainer.engine.module)
    params = [p for p in twin.parameters() if p.requires_grad]
    logp = trainer._token_logprobs(*trainer._logits(twin, batch), batch)
    grads = torch.autograd.grad(-(logp * batch.mask).sum() / batch.mask.sum(), params)
    expected = float(torch.nn.utils.get_total_norm(grads))
    metrics = trainer.train_step([batch])
    assert expected > 1e-3
    assert metrics["grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["clip_frac"] == 0.0
    assert metrics["is_weight_mean"] == pytest.approx(1.0)
    assert metrics["revisions"] == 1.0 and metrics["reward_mean"] == 0.0   # no judged answer in the step
    plain = Trainer(settings(method="combined", grad_clip=1e-6, adv_norm="batch", loss=no_kl), tiny_model_dir)
    as_sampled = plain.train_step([collate([sample.model_copy(update={"revision_of": None})], plain.pad_id)])
    assert as_sampled["clip_frac"] == 1.0 and as_sampled["grad_norm"] == 0.0


def test_a_teachers_own_answer_trains_as_a_revision_at_the_weight_the_run_gives_it(tiny_model_dir):
    """The hinted teacher's answer is trained like a revision (the policy now as its behaviour
    policy, ratio 1 on the first pass) with its advantage times learner.teacher_answers: at
    weight 2 the first pass's gradient is twice that at weight 1 (no clip, no KL, one pass)."""
    no_kl = LossSettings(kl_coef=0.0)
    answer = make_sample(5, reward=0.0).model_copy(update={
        "behaviour_logprobs": [-30.0] * 3, "advantage": 1.0, "normaliser": "teacher", "revision_of": "a"})

    def norm(weight: float) -> dict[str, float]:
        trainer = Trainer(settings(method="combined", grad_clip=1e6, adv_norm="batch", loss=no_kl,
                                   epochs=1, teacher_answers=weight), tiny_model_dir)
        return trainer.train_step([collate([answer], trainer.pad_id)])

    one, two = norm(1.0), norm(2.0)
    assert one["ratio_mean"] == pytest.approx(1.0) and one["clip_frac"] == 0.0
    assert one["teacher_answers"] == 1.0 and one["revisions"] == 0.0 and one["reward_mean"] == 0.0
    assert one["grad_norm"] > 1e-4 and two["grad_norm"] == pytest.approx(2 * one["grad_norm"], rel=1e-3)


def test_teacher_answers_fade_by_the_answers_trained_and_the_count_survives_a_restart(tiny_model_dir, tmp_path):
    """learner.teacher_answers_halflife h: the answers' advantage halves with every h of them
    trained. A step of two answers at h 2 trains them whole; the next step's weight is 0.5 (its
    first pass's gradient half that of an unfaded run on the same weights), and a learner
    restarted from the checkpoint between them goes on from the same count."""
    no_kl = LossSettings(kl_coef=0.0)
    answer = make_sample(5, reward=0.0).model_copy(update={
        "behaviour_logprobs": [-30.0] * 3, "advantage": 1.0, "normaliser": "teacher", "revision_of": "a"})
    fading = settings(method="combined", grad_clip=1e6, adv_norm="batch", loss=no_kl, epochs=1,
                      teacher_answers_halflife=2.0)
    first = Trainer(fading, tiny_model_dir)
    step = first.train_step([collate([answer, answer.model_copy(update={"sample_id": "s2"})], first.pad_id)])
    assert step["teacher_answers"] == 2.0 and step["teacher_answer_weight"] == 1.0
    first.save(tmp_path / "ckpt", {})
    again = Trainer(fading, tiny_model_dir)
    again.restore(tmp_path / "ckpt")
    whole = Trainer(settings(method="combined", grad_clip=1e6, adv_norm="batch", loss=no_kl, epochs=1),
                    tiny_model_dir)
    whole.restore(tmp_path / "ckpt")
    assert again.answer_weight() == 0.5 and whole.answer_weight() == 1.0
    faded, full = (t.train_step([collate([answer], t.pad_id)]) for t in (again, whole))
    assert faded["teacher_answer_weight"] == 0.5 and "teacher_answer_weight" not in full
    assert full["grad_norm"] > 1e-4
    assert faded["grad_norm"] == pytest.approx(0.5 * full["grad_norm"], rel=1e-3)
    assert again.answer_weight() == pytest.approx(0.5 ** 1.5)


def test_approval_balance_lets_the_teacher_lead_while_users_reject_and_their_verdicts_once_they_approve(
        tiny_model_dir):
    """learner.loss.balance "approval": with s the share of approvals among the verdicts in the
    running window (this step's among them), the verdicts' reward terms weigh min(1, 2s) and the
    teacher term min(1, 2(1 − s)). On the same weights and window, the first pass's gradient is
    exactly that fraction of the fixed weights' one."""
    assert balanced_weights(1.0, 1.0, None) == (1.0, 1.0)
    assert balanced_weights(1.0, 1.0, 0.5) == (1.0, 1.0)
    assert balanced_weights(2.0, 1.0, 0.125) == pytest.approx((0.5, 1.0))
    assert balanced_weights(1.0, 2.0, 0.875) == pytest.approx((1.0, 0.5))
    assert RewardWindow(8, [0.0, 0.0]).approval() is None
    assert RewardWindow(8, [1.0, 0.0, -1.0, -1.0]).approval() == pytest.approx(1 / 3)
    token = LossSettings(kl_coef=0.0, opd_form="token")

    def step(sample, window: list[float], balance: str) -> dict[str, float]:
        trainer = Trainer(settings(method="combined", grad_clip=1e6, adv_norm="running", epochs=1,
                                   loss=token.model_copy(update={"balance": balance})), tiny_model_dir)
        trainer.reward_window = RewardWindow(64, window)
        return trainer.train_step([collate([sample], trainer.pad_id)])

    # users reject most answers: a rejected answer's reward term at 2 · 1/8
    rejected = make_sample(1, reward=-1.0)
    window = [1.0] + [-1.0] * 6
    balanced, fixed = step(rejected, window, "approval"), step(rejected, window, "fixed")
    assert balanced["approval_share"] == pytest.approx(1 / 8)
    assert balanced["verdict_weight"] == pytest.approx(0.25) and balanced["w_opd"] == 1.0
    assert "verdict_weight" not in fixed and fixed["grad_norm"] > 1e-4
    assert balanced["grad_norm"] == pytest.approx(0.25 * fixed["grad_norm"], rel=1e-3)
    # users approve most: a hinted answer whose verdict is the window's mean (no reward term left)
    # trains its teacher term at 2 · (1 − 7/8)
    hinted = make_sample(2, reward=5 / 7, teacher=True)
    window = [1.0] * 6 + [-1.0]
    balanced, fixed = step(hinted, window, "approval"), step(hinted, window, "fixed")
    assert balanced["approval_share"] == pytest.approx(7 / 8) and balanced["w_opd"] == pytest.approx(0.25)
    assert fixed["grad_norm"] > 1e-4
    assert balanced["grad_norm"] == pytest.approx(0.25 * fixed["grad_norm"], rel=1e-3)
    with pytest.raises(LearnerError, match="adv_norm=running"):
        Trainer(settings(method="combined", adv_norm="batch", loss=LossSettings(balance="approval")), tiny_model_dir)


def test_a_teachers_own_answer_by_gap_pushes_each_token_by_the_teachers_lead_over_the_policy(tiny_model_dir):
    """learner.teacher_answer_credit "gap": each token of the teacher's answer is pushed by
    clip(teacher − policy, ±opd_clip), its logprob under the hint (the sample's behaviour
    logprobs) over the policy's now: up where the teacher leads, not at all where the policy
    already agrees, down (clipped) where the policy is surer. The first pass's gradient is that
    of −Σ lead·logp / tokens, and the metric is the mean lead."""
    no_kl = LossSettings(kl_coef=0.0, opd_clip=2.0)
    trainer = Trainer(settings(method="combined", grad_clip=1e6, adv_norm="batch", loss=no_kl, epochs=1,
                               teacher_answer_credit="gap"), tiny_model_dir)
    answer = make_sample(5, reward=0.0).model_copy(update={
        "behaviour_logprobs": [0.0] * 3, "advantage": 1.0, "normaliser": "teacher", "revision_of": "a"})
    twin = copy.deepcopy(trainer.engine.module)
    probe = collate([answer], trainer.pad_id)
    now = trainer._token_logprobs(*trainer._logits(twin, probe), probe).detach()
    own = now[probe.mask.bool()].tolist()
    assert len(own) == 3
    answer = answer.model_copy(update={"behaviour_logprobs": [own[0] + 0.5, own[1], own[2] - 5.0]})
    batch = collate([answer], trainer.pad_id)
    lead = torch.zeros_like(now)
    lead[batch.mask.bool()] = torch.tensor([0.5, 0.0, -2.0])
    params = [p for p in twin.parameters() if p.requires_grad]
    logp = trainer._token_logprobs(*trainer._logits(twin, batch), batch)
    grads = torch.autograd.grad(-(lead * logp * batch.mask).sum() / batch.mask.sum(), params)
    expected = float(torch.nn.utils.get_total_norm(grads))
    metrics = trainer.train_step([batch])
    assert expected > 1e-5
    assert metrics["grad_norm"] == pytest.approx(expected, rel=1e-3)
    assert metrics["teacher_answer_gap"] == pytest.approx(-0.5, abs=1e-4)
    assert metrics["teacher_answers"] == 1.0 and metrics["ratio_mean"] == pytest.approx(1.0)
    flat = Trainer(settings(method="combined", grad_clip=1e6, adv_norm="batch", loss=no_kl, epochs=1),
                   tiny_model_dir).train_step([batch])
    assert "teacher_answer_gap" not in flat and flat["grad_norm"] != pytest.approx(expected, rel=1e-2)


def test_a_step_without_signal_leaves_weights_and_optimizer_as_they_were(tiny_model_dir, tmp_path):
    """Two approved answers under batch normalisation have advantage 0: Adam would still move
    every weight along its momentum from the step before. The step is skipped instead, so a
    learner that met it ends exactly where one that never did, and the weight files it saves
    are byte for byte the ones before (what lets serving relabel instead of reload)."""
    ls = settings(method="rl", lr=1e-2, adv_norm="batch", epochs=2)
    with_it, without = Trainer(ls, tiny_model_dir), Trainer(ls, tiny_model_dir)
    mixed = lambda seed: [collate([make_sample(seed, reward=1.0), make_sample(seed + 1, reward=-1.0)], 0)]  # noqa: E731
    for trainer in (with_it, without):
        trainer.train_step(mixed(10))
    after_first = _trainable(with_it)
    saved = with_it.save(tmp_path / "before", {}) / "weights"
    still = with_it.train_step([collate([make_sample(20, reward=1.0), make_sample(21, reward=1.0)], 0)])
    assert still["skipped"] == 1.0 and still["trained_tokens"] == 0.0 and still["samples"] == 2
    assert with_it.engine.global_steps == 2   # the first step's two passes only
    assert all(torch.equal(after_first[k], v) for k, v in _trainable(with_it).items())
    again = with_it.save(tmp_path / "after", {}) / "weights"
    files = sorted(p.relative_to(saved) for p in saved.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((saved / f).read_bytes() == (again / f).read_bytes() for f in files)
    for trainer in (with_it, without):
        trainer.train_step(mixed(30))
    a, b = _trainable(with_it), _trainable(without)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same pair with a teacher distribution has signal: the KL term trains
    opd = Trainer(settings(method="combined", lr=1e-2, adv_norm="batch",
                           loss=LossSettings(opd_form="topk_forward", kl_coef=0.0)), tiny_model_dir)
    taught = opd.train_step([collate([make_sample(40, reward=1.0, teacher=True, top_k=4),
                                      make_sample(41, reward=1.0, teacher=True, top_k=4)], 0)])
    assert taught["skipped"] == 0.0 and taught["distill_kl"] > 0
    # a KL term to the base alone is no signal: it only regularises what a signal moves
    held = Trainer(settings(method="rl", lr=1e-2, adv_norm="batch",
                            loss=LossSettings(kl_coef=1.0, kl_form="full")), tiny_model_dir)
    held.train_step(mixed(10))
    assert held.train_step([collate([make_sample(20, reward=1.0), make_sample(21, reward=1.0)], 0)])["skipped"] == 1.0


@pytest.mark.parametrize("lora,form", [(True, "full"), (False, "full"), (True, "k3")])
def test_kl_to_the_base_is_zero_at_the_base_and_holds_the_policy_near_it(tiny_model_dir, lora, form):
    """The first step's policy is the base (KL 0). Two learners take the same steps; the one
    whose KL term weighs 1 ends nearer the base than the one whose weighs ~0 (the metric is the
    unweighted KL either way): the term's gradient reaches the weights."""
    def run(coef: float) -> list[float]:
        trainer = Trainer(settings(method="rl", lora=lora, lr=1e-2, loss=LossSettings(kl_coef=coef, kl_form=form)),
                          tiny_model_dir)
        return [trainer.train_step([collate([make_sample(5, reward=1.0), make_sample(6, reward=-1.0)],
                                            trainer.pad_id)])["kl"] for _ in range(5)]

    held, free = run(1.0), run(1e-9)
    assert held[0] == pytest.approx(0.0, abs=1e-6) and free[0] == pytest.approx(0.0, abs=1e-6)
    assert free[-1] > 0 and held[-1] < free[-1]


def test_kl_on_the_start_is_the_full_kl_at_each_response_s_first_tokens(tiny_model_dir):
    """`kl_on=start` takes the reference's distribution only at the first tokens of each
    response; what it gives there is the exact KL the every-token form gives, and 0 elsewhere."""
    def kl(on: str) -> tuple[torch.Tensor, torch.Tensor]:
        trainer = Trainer(settings(method="rl", lora=True, lr=1e-2, adv_norm="batch",
                                   loss=LossSettings(kl_coef=1.0, kl_form="full", kl_on=on, kl_start_tokens=2)),
                          tiny_model_dir)
        torch.manual_seed(0)
        for _, p in trainer.engine.module.named_parameters():   # move the adapter off the base
            if p.requires_grad:
                p.data.normal_(0, 0.05)
        batch = collate([make_sample(5, reward=1.0), make_sample(6, reward=-1.0, prompt_len=7),
                         # two assistant turns, a tool's output between them
                         make_sample(7, response_len=7, loss_mask=[1, 1, 1, 0, 0, 1, 1])], trainer.pad_id)
        with torch.no_grad():
            logits, start = trainer._logits(trainer.engine, batch)
            lse = torch.logsumexp(logits, dim=-1)
            return trainer._reference_kl(logits, lse, trainer._token_logprobs(logits, start, batch, lse),
                                         start, batch, trainer._reference(batch, start)), batch.mask

    (start_kl, mask), (every, _) = kl("start"), kl("all")
    first = span_starts(mask, 2).bool()
    assert int(first.sum()) == 8 and bool((every[first] > 0).all())
    assert torch.allclose(start_kl[first], every[first], atol=1e-6)
    assert bool((start_kl[~first] == 0).all())


@pytest.mark.parametrize("form", ["full", "k3"])
def test_a_step_takes_the_reference_once_and_trains_as_if_it_took_it_every_pass(tiny_model_dir, monkeypatch, form):
    """The base does not change within a step: its side of the KL is taken on the first pass
    and kept for the later ones, with the same weights as a step that takes it every pass."""
    def run(kept: bool) -> tuple[int, dict[str, torch.Tensor]]:
        trainer = Trainer(settings(method="rl", lora=True, lr=1e-2, epochs=3, adv_norm="batch",
                                   loss=LossSettings(kl_coef=1.0, kl_form=form, kl_on="start")), tiny_model_dir)
        calls = []
        taken = trainer._reference
        monkeypatch.setattr(trainer, "_reference", lambda *a: calls.append(1) or taken(*a))
        monkeypatch.setattr(trainer, "_reference_kept", lambda: kept)
        for seed in (3, 9):
            trainer.train_step([collate([make_sample(seed, reward=1.0), make_sample(seed + 1, reward=-1.0)],
                                        trainer.pad_id),
                                collate([make_sample(seed + 2, reward=-1.0)], trainer.pad_id)])
        return len(calls), _trainable(trainer)

    (once, kept), (every, fresh) = run(True), run(False)
    assert once == 2 * 2 and every == 2 * 2 * 3   # steps × micro-batches (× passes)
    assert kept.keys() == fresh.keys()
    assert all(torch.allclose(kept[n], fresh[n], atol=1e-6) for n in kept)


def test_a_guided_teacher_and_a_kl_share_one_base_forward(tiny_model_dir, monkeypatch):
    """With both a KL to the base and a guided teacher term the base's logits are taken once
    per micro-batch a step, for both, and the step is what it is when each takes its own."""
    batches = lambda pad: [collate([make_sample(4, teacher=True, top_k=4, reward=-1.0)], pad),
                           collate([make_sample(5, teacher=True, top_k=4, reward=1.0)], pad)]
    loss = LossSettings(kl_coef=1.0, kl_form="full", kl_on="start", opd_guidance=1.0)
    runs = {}
    for shared in (True, False):
        trainer = Trainer(settings(method="combined", lr=1e-2, epochs=3, loss=loss), tiny_model_dir)
        calls = []
        taken = trainer._base_logits
        monkeypatch.setattr(trainer, "_base_logits", lambda *a: calls.append(1) or taken(*a))
        if not shared:   # each side takes its own forward of the base, as before
            guide, ref = trainer._guide, trainer._reference
            monkeypatch.setattr(trainer, "_guide", lambda b, s, lg, ls, base=None: guide(b, s, lg, ls))
            monkeypatch.setattr(trainer, "_reference", lambda b, s, base=None: ref(b, s))
        metrics = trainer.train_step(batches(trainer.pad_id))
        assert metrics["kl"] > 0 and metrics["distill_kl"] > 0
        runs[shared] = (len(calls), _trainable(trainer))
    assert runs[True][0] == 2     # micro-batches: not × passes, not × terms
    assert all(torch.allclose(runs[True][1][n], runs[False][1][n], atol=1e-6) for n in runs[True][1])


@pytest.mark.parametrize("lora", [True, False])
def test_the_flatness_term_holds_the_policy_as_sure_as_the_base(tiny_model_dir, monkeypatch, lora):
    """At the first step the policy is the base: no entropy gap, nothing to hold. Against a base
    made sharper than the policy (its logits ×4: the tiny random model is nearly uniform), two
    learners take the same steps; the one whose flatness term weighs 10 becomes surer than the
    one whose weighs ~0 (the metrics are unweighted either way): the term's gradient reaches
    the weights, with LoRA and with a frozen copy, and the base is taken once a micro-batch.
    (A rank-4 adapter on the tiny model moves its entropy slowly: 0.413 → 0.404 in 6 steps.)"""
    def steps(trainer: Trainer, n: int) -> list[dict[str, float]]:
        return [trainer.train_step([collate([make_sample(5, reward=1.0), make_sample(6, reward=-1.0)],
                                            trainer.pad_id)]) for _ in range(n)]

    def trainer(coef: float) -> Trainer:
        return Trainer(settings(method="rl", lora=lora, lr=2e-2, epochs=2, loss=LossSettings(flat_coef=coef)),
                       tiny_model_dir)

    first = steps(trainer(1.0), 1)[0]
    assert first["entropy_gap"] == pytest.approx(0.0, abs=1e-5) and first["flat"] == pytest.approx(0.0, abs=1e-5)

    def run(coef: float) -> tuple[list[dict[str, float]], int]:
        t, calls = trainer(coef), []
        taken = t._base_logits
        monkeypatch.setattr(t, "_base_logits", lambda *a: calls.append(1) or 4 * taken(*a))
        return steps(t, 6), len(calls)

    (held, held_calls), (free, _) = run(10.0), run(1e-9)
    assert held_calls == 6                 # one micro-batch a step: not × passes
    assert held[0]["entropy_gap"] == pytest.approx(free[0]["entropy_gap"]) and held[0]["flat"] > 0.1
    assert held[-1]["flat"] < free[-1]["flat"] - 0.005


def _train(trainer: Trainer, seeds: list[int]) -> None:
    for seed in seeds:
        trainer.train_step([collate([make_sample(seed, reward=1.0 if seed % 2 else -1.0),
                                     make_sample(seed + 100, reward=0.5)], trainer.pad_id)])


def _trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora,zero", [(True, 0), (True, 2), (False, 2)])
def test_save_restore_resumes_exactly(tiny_model_dir, tmp_path, lora, zero):
    # running normalisation: step 3's advantages depend on steps 1-2's rewards, so the two
    # learners below agree only if the reward window came back with the checkpoint too
    ls = settings(lora=lora, zero_stage=zero, lr=1e-2, lr_schedule="cosine", warmup_steps=2,
                  total_steps=10, loss=LossSettings(kl_coef=0.1, entropy_coef=0.01),
                  adv_norm="running", adv_window=8)
    first = Trainer(ls, tiny_model_dir)
    _train(first, [1, 2])
    first.save(tmp_path / "ckpt", {"step": 2})
    at_save = _trainable(first)
    second = Trainer(ls, tiny_model_dir)
    assert second.restore(tmp_path / "ckpt")["step"] == 2
    assert list(second.reward_window.values) == list(first.reward_window.values) == [1.0, 0.5, -1.0, 0.5]
    assert all(torch.equal(a, b) for a, b in zip(_trainable(first).values(), _trainable(second).values()))
    _train(first, [3])
    _train(second, [3])  # same data: identical only if optimizer moments and LR step came back
    after_first, after_second = _trainable(first), _trainable(second)
    assert after_first.keys() == after_second.keys()
    assert all(torch.equal(after_first[k], after_second[k]) for k in after_first)

    weights = tmp_path / "ckpt" / "weights"
    names = {p.name for p in weights.iterdir()}
    if lora:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert "model.safetensors" not in names  # the adapter only, never the base
        assert json.loads((weights / "adapter_config.json").read_text())["r"] == 4
    else:
        from transformers import AutoModelForCausalLM

        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
        saved = dict(AutoModelForCausalLM.from_pretrained(weights).named_parameters())
        assert set(saved) <= set(at_save)
        assert all(torch.equal(saved[n].detach(), at_save[n]) for n in saved)


def test_logits_only_where_trained_give_the_full_forward_logprobs(tiny_model_dir):
    """The vocabulary projection starts at the batch's first trained target; the logprobs of
    the trained tokens are those of a full forward, and nothing before it is trained."""
    trainer = Trainer(settings(method="rl"), tiny_model_dir)
    batch = collate([make_sample(3, reward=1.0), make_sample(7, reward=-1.0)], trainer.pad_id)
    with torch.no_grad():
        logits, start = trainer._logits(trainer.engine, batch)
        trimmed = trainer._token_logprobs(logits, start, batch)
        full = trainer.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        reference = full.log_softmax(-1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert start > 0 and logits.shape[1] == batch.mask.shape[1] - start
    on = batch.mask > 0
    assert torch.allclose(trimmed[on], reference[on], atol=1e-5)
    assert not on[:, :start].any() and (trimmed[:, :start] == 0).all()


def test_the_loop_guard_recalls_earlier_contexts_and_its_memory_comes_back_with_the_checkpoint(
        tiny_model_dir, tmp_path):
    """Besides the step's own contexts the guard answers earlier ones (the least checked
    first); a restored learner remembers the same contexts, so its next step checks what the
    first learner's does."""
    guard = LoopGuardSettings(prompts=1, recall=2, memory=8, max_new_tokens=8)
    ls = settings(method="rl", lr=1e-2, loop_guard=guard)
    first = Trainer(ls, tiny_model_dir)
    a, b, c = (make_sample(seed, reward=1.0, prompt_len=4 + seed) for seed in (1, 2, 3))
    m1 = first.train_step([collate([a], first.pad_id)])
    assert (m1["loop_guard_answers"], m1["loop_guard_recalled"]) == (1, 0)   # nothing earlier yet
    m2 = first.train_step([collate([b, c], first.pad_id)])
    # b's context checked, a's recalled; c's seen and remembered unchecked
    assert (m2["loop_guard_answers"], m2["loop_guard_recalled"]) == (2, 1)
    state = first.loop_guard.memory.state()
    assert sorted(n for _, n in state) == [0, 1, 2]
    first.save(tmp_path / "ckpt", {"step": 2})
    second = Trainer(ls, tiny_model_dir)
    second.restore(tmp_path / "ckpt")
    assert second.loop_guard.memory.state() == state
    d = make_sample(4, reward=1.0, prompt_len=9)
    recalled = [first.loop_guard.memory.recall(2, exclude=[list(d.prompt_token_ids)]),
                second.loop_guard.memory.recall(2, exclude=[list(d.prompt_token_ids)])]
    # the unchecked context (c's) first, then b's (checked once); a's was checked twice
    assert recalled[0] == recalled[1] == [list(c.prompt_token_ids), list(b.prompt_token_ids)]


def test_approved_answers_are_trained_again_in_later_steps_and_come_back_with_the_checkpoint(
        tiny_model_dir, tmp_path):
    """With learner.approved on, an answer approved in one step is trained again in the next,
    as the policy's own (ratio 1 on the first pass, whatever its recorded logprobs), and rises
    further than without; a rejected one is not remembered; the memory is in the checkpoint."""
    approved = make_sample(1, reward=1.0).model_copy(update={"behaviour_logprobs": [-30.0] * 3})
    rejected = make_sample(2, reward=-1.0)
    later = make_sample(3, reward=-1.0, prompt_len=5)
    no_kl = LossSettings(kl_coef=0.0)

    def run(replay: int) -> tuple[Trainer, list[dict[str, float]]]:
        trainer = Trainer(settings(method="combined", lr=1e-2, loss=no_kl, approved={"replay": replay}),
                          tiny_model_dir)
        first = trainer.train_step([collate([approved, rejected], trainer.pad_id)])
        return trainer, [first, trainer.train_step([collate([later], trainer.pad_id)])]

    with_replay, (m1, m2) = run(replay=2)
    without, (n1, n2) = run(replay=0)
    assert m1["approved_replayed"] == 0 and m1["approved_new"] == 1 and m1["approved_kept"] == 1
    assert m2["approved_replayed"] == 1 and m2["approved_tokens"] == 3 and m2["approved_new"] == 0
    assert "approved_replayed" not in n2
    # the step's own sample and the replay: its trained tokens, one more sample's worth
    assert m2["trained_tokens"] == n2["trained_tokens"] + 3 and m2["samples"] == n2["samples"] == 1
    assert response_logprob(with_replay, approved) > response_logprob(without, approved)
    with_replay.save(tmp_path / "ckpt", {"step": 2})
    restored = Trainer(settings(method="combined", loss=no_kl, approved={"replay": 2}), tiny_model_dir)
    restored.restore(tmp_path / "ckpt")
    assert restored.approved.state() == with_replay.approved.state() != []
