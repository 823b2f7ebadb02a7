"""Loss and advantage math of the learner: Binary RL, OPD, Combined, KL, entropy, stale-data IS.

Pure torch, the standard library and the method table: no Kafka, DeepSpeed, model or file I/O here, so every
rule is tested on hand-computed tensors. Per-token tensors are ``[B, T]``, aligned to the
*target* tokens (position t holds the logprob of token t+1 of the sequence), and ``mask`` is 1
where a response token is trained on.

Conventions (documented once, here):

- **Advantages.** Each method (schemas.methods) turns on a reward term, ``w_rl·r`` on every
  response token, and/or a teacher term, ``w_opd·clip(teacher_lp − student_lp, ±opd_clip)`` per
  token, where ``student_lp`` is the *behaviour* logprob recorded by the serving engine at
  sampling time (the policy that actually produced the tokens), not a logprob recomputed here.
  RL is the first, OPD the second, Combined both; a sample without teacher logprobs gets no
  teacher term (never ``0 − behaviour``).
- **Teacher term by distribution** (``opd_form`` ``topk_forward`` / ``topk_reverse``). Where a
  sample carries the teacher's top-K ids and logprobs at each position, the teacher term is
  not an advantage on the sampled token but ``w_opd·KL`` between the teacher's and the current
  policy's next-token distributions on K + 1 bins (the teacher's K tokens and the rest of the
  vocabulary as one tail bin), added to the loss at every trained position: forward
  ``KL(teacher‖policy)`` (mode-covering) or reverse ``KL(policy‖teacher)`` (mode-seeking). It
  moves probability towards every token the teacher prefers (the end of a short answer
  included), where the sampled-token gap only pushes the one sampled token up or down.
  Samples without top-K rows keep the sampled-token term. ``token`` is the sampled-token
  term only. ``opd_temperature`` below 1 takes the teacher's bins sharper (`tempered_bins`),
  at every position or, with ``opd_temperature_tokens`` n, at the first n of each response.
  ``opd_guidance`` g > 0 takes the teacher further along what the hint changed
  (`guided_bins`): per bin ``log t + g·clip(log t − log u, ±opd_guidance_cap)``, renormalised,
  where u is the base model's distribution in the student's own (unhinted) context. The
  hinted teacher moves many tokens only a little away from the base; the gap is the hint's
  effect, and g scales it. The cap keeps a token the base almost never writes (the hint's own
  words, its labels) from being raised by more than a factor e^(g·cap). ``opd_anchor =
  policy`` moves the policy's own bins (at the step's first pass) instead of the teacher's:
  ``log π + g·clip(log t − log u, ±cap)``, the policy times the hint's likelihood ratio, so
  the term carries what the hint changes and never pulls the policy back towards the base
  model that the teacher is (with π = u, g = 1 and no cap reached it is the teacher).
- **The teacher term's scale** (``opd_norm``). Like every term it is summed over its tokens
  and divided by the step's trained tokens ("step"). Where only some samples carry a teacher
  (a personal agent's hinted turns) that is a weight of their share of the step's tokens:
  "teacher" divides by their tokens instead, so the term weighs what it weighs in OPD alone.
- **Negative advantages** are scaled by ``neg_weight`` (1: as they are) before the surrogate.
- **Surrogate.** PPO clipped, asymmetric: ``max(−ρA, −clip(ρ, 1−ε_low, 1+ε_high)·A)`` with
  ``ρ = π_θ / π_behaviour``.
- **Stale samples** (older than the allowed lag, under the ``correct`` policy) use the decoupled
  form: the proximal policy is the current weights at forward time (``ρ = π_θ / sg(π_θ)``), and
  the behaviour gap is corrected by a truncated importance weight
  ``min(sg(π_θ) / π_behaviour, tis_cap)``. Without it the clip would zero their gradient.
- **KL to the reference** (``kl_coef`` > 0): ``k3`` estimates KL(π_θ‖π_ref) from the sampled
  token alone (``exp(d) − d − 1``, d = ref − logp); ``full`` is the exact KL of the two
  next-token distributions over the whole vocabulary at each trained position. ``kl_on =
  negative`` keeps it to the tokens whose advantage is below zero: pushed down, their
  probability goes wherever the model puts it; a token pushed up stays free. ``kl_on =
  start`` keeps it to the first ``kl_start_tokens`` tokens of every trained span (a response):
  the positions whose context is nearly the same in every sample, where an update adds up
  across prompts and moves the policy most.
- **No flatter than the base** (``flat_coef`` > 0): ``relu(H_π − H_base − flat_margin)`` at
  every trained position, H the entropy of the next-token distribution, H_base the base
  model's in the same context (no gradient). Pushed-down tokens hand their probability to the
  rest of the vocabulary, and the updates flatten the policy where every answer starts; the
  term only acts where the policy is less sure than the base and leaves it free to be surer.
  Moving an answer's start from one token to another passes through flatter distributions,
  and with no margin the term holds that too (README, "How sure the policy is").
- **Unlikelihood** (learner.loop_guard): ``−log(1 − p)`` of each token marked as a repeat in
  the policy's own looping greedy answers, ``coef``-weighted and divided by the step's trained
  token count like every other term; it fades as p falls, where −log p would not stop.
- **Aggregation.** Token-mean over the loss-mask tokens of the whole optimizer step: each
  micro-batch contributes ``sum(loss over its mask tokens) / N_step``. Long responses weigh more
  than short ones, and a fully masked sample contributes exactly nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from schemas.methods import MethodRule

# exp() of a log-ratio beyond this overflows float32 and turns gradients into NaN; real
# ratios never get near it, padded or wildly stale positions can.
_LOG_RATIO_LIMIT = 20.0


class LossParams(Protocol):
    """The loss's knobs: infra.settings.LossSettings (`learner.loss`), taken as it is."""

    clip_low: float
    clip_high: float
    opd_clip: float
    opd_form: str
    opd_temperature: float
    opd_temperature_tokens: int
    opd_guidance: float
    opd_guidance_cap: float
    opd_anchor: str
    opd_norm: str
    w_rl: float
    w_opd: float
    neg_weight: float
    kl_coef: float
    kl_form: str
    kl_on: str
    kl_start_tokens: int
    entropy_coef: float
    flat_coef: float
    flat_margin: float
    tis_cap: float
    eps: float


# -- advantages ---------------------------------------------------------------------------

def opd_term(teacher: torch.Tensor, behaviour: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-token distillation advantage: teacher minus student (behaviour) logprob, clipped."""
    return torch.clamp(teacher - behaviour, -clip, clip)


def advantages(rule: MethodRule, rewards: torch.Tensor, teacher: torch.Tensor, behaviour: torch.Tensor,
               has_teacher: torch.Tensor, cfg: LossParams) -> torch.Tensor:
    """Token advantages [B, T] by the method's terms (schemas.methods): ``w_rl·r`` broadcast over
    the response, plus ``w_opd·clip(teacher − behaviour)`` where the sample has teacher logprobs."""
    adv = torch.zeros_like(behaviour)
    if rule.reward_term:
        adv = adv + cfg.w_rl * rewards[:, None]
    if rule.teacher_term:
        adv = adv + cfg.w_opd * opd_term(teacher, behaviour, cfg.opd_clip) * has_teacher[:, None]
    return adv


OPD_FORMS = ("token", "topk_forward", "topk_reverse")

# Stands in for log 0 at padded top-K entries: exp() of it is exactly 0 in float32, and unlike
# -inf it never turns a logsumexp's backward into NaN.
_LOG_ZERO = -1e4


def _with_tail(top: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[..., K] logprobs → [..., K+1] log-probabilities of the K tokens and of everything else."""
    top = torch.where(valid, top, torch.full_like(top, _LOG_ZERO))
    covered = torch.clamp(torch.logsumexp(top, dim=-1, keepdim=True), max=-1e-6)
    tail = torch.log(-torch.expm1(covered))
    return torch.cat([top, tail], dim=-1)


def tempered_bins(top: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's K + 1 bins (`_with_tail`) at `temperature`: each top-K logprob divided by it,
    and the tail as if its mass were spread over tokens as likely as the least likely of the K
    (tail · p_K^(1/T − 1): for T < 1 the most a tail of tokens no likelier than p_K can keep),
    all renormalised. The tail is not one token: tempered as one, a tail heavier than any
    single token would grow instead of shrink. T = 1 is `_with_tail`."""
    bins = _with_tail(top, valid)
    if temperature == 1.0:
        return bins
    least = torch.where(valid, top, torch.zeros_like(top)).min(-1).values
    tail = bins[..., -1] + (1.0 / temperature - 1.0) * least
    scaled = torch.cat([bins[..., :-1] / temperature, tail.unsqueeze(-1)], dim=-1)
    out = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    return torch.where(valid.any(-1, keepdim=True), out, bins)


def guided_bins(teacher: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, guidance: float,
                cap: float, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's K + 1 bins taken `guidance` further along the hint's effect: per bin
    ``teacher + guidance·clip(teacher − base, ±cap)`` (log space), renormalised, with `base`
    the base model's bins on the same ids in the unhinted context. Given `anchor` (the policy's
    bins), the effect moves those instead of the teacher's. ``guidance`` 0 is `teacher`.
    A position with no valid entry keeps the teacher's bins."""
    if guidance == 0:
        return teacher
    effect = torch.clamp(teacher - base, -cap, cap)
    out = (teacher if anchor is None else anchor) + guidance * effect
    out = out - torch.logsumexp(out, dim=-1, keepdim=True)
    return torch.where(valid.any(-1, keepdim=True), out, teacher)


def topk_kl(student_top: torch.Tensor, teacher_top: torch.Tensor, valid: torch.Tensor,
            direction: str, temperature: float = 1.0, base_top: torch.Tensor | None = None,
            guidance: float = 0.0, cap: float = 1.0, anchor_top: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position KL [B, T] on K + 1 bins, from the logprobs both policies give the teacher's
    top-K ids [B, T, K] (padding marked False in `valid`): ``forward`` KL(teacher‖student),
    ``reverse`` KL(student‖teacher). A position with no valid entry has KL 0. The teacher's
    bins are taken at `temperature` (`tempered_bins`; below 1 sharper) and, given the base
    model's logprobs of the same ids (`base_top`), `guidance` further along the hint's effect
    (`guided_bins`), from the policy's own logprobs of them (`anchor_top`, no gradient) where
    given."""
    s = _with_tail(student_top, valid)
    t = tempered_bins(teacher_top.to(s.dtype), valid, temperature)
    if base_top is not None:
        anchor = None if anchor_top is None else _with_tail(anchor_top.detach().to(s.dtype), valid)
        t = guided_bins(t, _with_tail(base_top.to(s.dtype), valid), valid, guidance, cap, anchor)
    if direction == "forward":
        p, a, b = t.exp(), t, s
    elif direction == "reverse":
        p, a, b = s.exp(), s, t
    else:
        raise ValueError(f"unknown KL direction {direction!r}; known: forward, reverse")
    return (p * (a - b)).sum(-1)


def topk_direction(opd_form: str) -> str | None:
    """forward/reverse for a top-K ``opd_form``, None for ``token``."""
    if opd_form not in OPD_FORMS:
        raise ValueError(f"unknown opd_form {opd_form!r}; known: {', '.join(OPD_FORMS)}")
    return None if opd_form == "token" else opd_form.removeprefix("topk_")


# -- reward normalisation -----------------------------------------------------------------

def normalisation_keys(task_groups: Sequence[str | None], step_indices: Sequence[int | None],
                       mode: str) -> list[Hashable | None]:
    """The group each sample is normalised within; None means 'leave this reward alone'.

    ``group``: per task group. ``step``: per (task group, step index), the step-wise estimator
    of the environment tracks. ``batch``: every sample of the step together, a mean/std
    baseline for personal-agent traffic that has no task groups. ``running``: the step's samples
    together too, but against the last rewards of several steps (`RewardWindow`). ``none``: no
    normalisation.
    """
    if mode == "none":
        return [None] * len(task_groups)
    if mode in ("batch", "running"):
        return [mode] * len(task_groups)
    if mode == "group":
        return list(task_groups)
    if mode == "step":
        return [None if g is None or s is None else (g, s) for g, s in zip(task_groups, step_indices)]
    raise ValueError(f"unknown advantage normalisation {mode!r}; known: none, group, step, batch, running")


def normalise_rewards(rewards: torch.Tensor, keys: Sequence[Hashable | None],
                      eps: float = 1e-6) -> torch.Tensor:
    """(r − mean) / (std + eps) within each key's members of this step.

    A group with a single member gets advantage 0, as in GRPO: one sample has no baseline to
    compare against. Samples whose key is None keep their raw reward.
    """
    out = rewards.clone()
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            members.setdefault(key, []).append(i)
    for idx in members.values():
        r = rewards[idx]
        std = r.std(unbiased=False) if len(idx) > 1 else r.new_zeros(())
        out[idx] = (r - r.mean()) / (std + eps)
    return out


class RewardWindow:
    """The last `size` rewards the ``running`` normalisation has seen, across steps.

    A personal agent's step holds the few samples that arrived since the last one, often two or
    three with the same verdict; a mean/std over the step alone gives them no signal at all. The
    window's mean and spread are a baseline that spans steps. The trainer keeps it in its
    checkpoints, so a restarted learner goes on from the same baseline."""

    def __init__(self, size: int, values: Sequence[float] = ()) -> None:
        if size < 1:
            raise ValueError(f"a reward window holds at least one reward, not {size}")
        self.values: deque[float] = deque((float(v) for v in values), maxlen=size)

    def approval(self) -> float | None:
        """The share of approvals (reward > 0) among the verdicts (reward ≠ 0) in the window;
        None before any."""
        decided = [v for v in self.values if v != 0]
        return sum(v > 0 for v in decided) / len(decided) if decided else None

    def normalise(self, rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Adds `rewards` to the window, then (r − mean) / (std + eps) over the whole window."""
        self.values.extend(float(r) for r in rewards.tolist())
        window = rewards.new_tensor(list(self.values))
        return (rewards - window.mean()) / (window.std(unbiased=False) + eps)


def balanced_weights(w_rl: float, w_opd: float, approval: float | None) -> tuple[float, float]:
    """The reward and teacher terms' weights for a step under ``balance=approval``: with s the
    share of approvals, w_rl·min(1, 2s) and w_opd·min(1, 2(1 − s)); as given when s is None."""
    if approval is None:
        return w_rl, w_opd
    s = min(max(approval, 0.0), 1.0)
    return w_rl * min(1.0, 2 * s), w_opd * min(1.0, 2 * (1 - s))


def sample_rewards(rewards: torch.Tensor, advantage: torch.Tensor, has_advantage: torch.Tensor,
                   task_groups: Sequence[str | None], step_indices: Sequence[int | None], mode: str,
                   eps: float = 1e-6, window: RewardWindow | None = None) -> torch.Tensor:
    """What the reward term of each sample is this step: a sample whose advantage was
    precomputed (the group stage of general agents, already normalised per group and step)
    takes it as it is; the others are normalised by `mode` among themselves (``running``: with
    `window`, which their rewards join)."""
    precomputed = has_advantage.bool()
    if mode == "running":
        if window is None:
            raise ValueError("running normalisation needs a RewardWindow")
        normed = rewards.clone()
        own = ~precomputed
        if bool(own.any()):
            normed[own] = window.normalise(rewards[own], eps)
        return torch.where(precomputed, advantage, normed)
    keys = normalisation_keys(list(task_groups), list(step_indices), mode)
    keys = [None if done else key for key, done in zip(keys, precomputed.tolist())]
    normed = normalise_rewards(rewards, keys, eps)
    return torch.where(precomputed, advantage, normed)


# -- per-token terms ----------------------------------------------------------------------

def _safe_log_ratio(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where before exp(): masked positions must never produce inf, whose backward
    # would be 0·inf = NaN even though the forward value is discarded.
    diff = torch.where(mask > 0, a - b, torch.zeros_like(a))
    return torch.clamp(diff, -_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Low-variance KL(π_θ‖π_ref) estimate per token: exp(d) − d − 1, d = ref − logp; ≥ 0."""
    d = _safe_log_ratio(ref_logp, logp, mask)
    return (torch.exp(d) - d - 1.0) * mask


def unlikelihood(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−log(1 − p) per token where `mask` is 1, else 0 (p = exp(logp), kept below 1 so the
    term stays finite where the policy is sure of the token)."""
    p = logp.exp().clamp(max=1.0 - 1e-6)
    return -torch.log1p(-p) * mask


def flatness(entropy: torch.Tensor, base_entropy: torch.Tensor, margin: float) -> torch.Tensor:
    """Per position, how much flatter the policy is than the base beyond `margin` nats:
    relu(H_π − H_base − margin), [B, T]; the gradient flows through the policy's entropy."""
    return torch.relu(entropy - base_entropy.detach() - margin)


def full_kl(logits: torch.Tensor, lse: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(π_θ‖π_ref) of the next-token distributions at every position, [B, T]: the
    policy's logits [B, T, V] with their logsumexp [B, T], the reference's log-softmax [B, T, V].
    Unlike the sampled-token estimate it also sees the tokens no sample took, the greedy
    answer's among them."""
    logp = logits - lse.unsqueeze(-1)
    return (logp.exp() * (logp - ref_logprobs)).sum(-1)


def span_starts(mask: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T] 1 where a mask token is among the first `n` of its trained span (a run of mask
    tokens; a multi-turn sample has one per assistant turn), else 0."""
    on = mask > 0
    idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    # the last position at or before each one that is off the mask (-1 before the first)
    last_off = torch.cummax(torch.where(on, torch.full_like(idx, -1), idx), dim=-1).values
    return (on & (idx - last_off <= n)).to(mask.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at every position, [B, T, V] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class PolicyTerms:
    """Per-token policy loss and the statistics that explain it."""

    loss: torch.Tensor        # [B, T], zero off the mask
    ratio: torch.Tensor       # [B, T], detached, 1 off the mask
    clipped: torch.Tensor     # [B, T] bool, the clipped branch was taken (its gradient is 0)
    is_weight: torch.Tensor   # [B, T], detached truncated IS weight (1 for fresh samples)


def policy_terms(logp: torch.Tensor, behaviour: torch.Tensor, adv: torch.Tensor,
                 mask: torch.Tensor, stale: torch.Tensor, cfg: LossParams,
                 proximal_logp: torch.Tensor | None = None) -> PolicyTerms:
    """PPO clipped surrogate per token, decoupled with truncated IS for stale samples.

    `proximal_logp` is the stale samples' proximal policy: the weights at the step's first
    pass (the trainer keeps them for its later epochs); None means the weights now."""
    stale_tok = stale[:, None].expand_as(logp)
    prox = logp.detach() if proximal_logp is None else proximal_logp
    proximal = torch.where(stale_tok, prox, behaviour)
    ratio = torch.exp(_safe_log_ratio(logp, proximal, mask))
    is_weight = torch.where(
        stale_tok,
        torch.clamp(torch.exp(_safe_log_ratio(prox, behaviour, mask)), max=cfg.tis_cap),
        torch.ones_like(logp),
    )
    clipped_ratio = torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    unclipped_obj = -ratio * adv
    clipped_obj = -clipped_ratio * adv
    loss = is_weight * torch.maximum(unclipped_obj, clipped_obj) * mask
    clipped = (clipped_obj > unclipped_obj) & (mask > 0)
    return PolicyTerms(loss, ratio.detach(), clipped, is_weight.detach())


@dataclass
class MicroLoss:
    """One micro-batch's share of the step loss (already divided by the step's token count)
    and the sums the step's metrics are built from."""

    loss: torch.Tensor
    sums: dict[str, float]


def micro_batch_loss(logp: torch.Tensor, behaviour: torch.Tensor, adv: torch.Tensor,
                     mask: torch.Tensor, stale: torch.Tensor, step_tokens: int, cfg: LossParams,
                     kl: torch.Tensor | None = None,
                     entropy: torch.Tensor | None = None,
                     distill: torch.Tensor | None = None,
                     proximal_logp: torch.Tensor | None = None,
                     distill_tokens: int | None = None,
                     flat: torch.Tensor | None = None) -> MicroLoss:
    """policy (negative advantages × neg_weight) + w_opd·distill + kl_coef·KL − entropy_coef·H
    + flat_coef·flatness,
    summed over mask tokens, / the step's mask tokens. `distill` is the per-token top-K KL to the teacher (0 where a sample
    has none), `kl` the per-token KL to the reference (`k3_kl` or `full_kl`), on every mask
    token, (``kl_on = negative``) on those whose advantage is below zero, or (``start``) on
    the first ``kl_start_tokens`` of each trained span. With ``opd_norm = teacher`` the
    distill sum is divided by `distill_tokens` instead (the step's mask tokens of the samples
    that carry a teacher distribution). `flat`: `flatness` per token."""
    mask = mask.to(logp.dtype)
    denom = float(max(step_tokens, 1))
    pushed_down = adv < 0
    if cfg.neg_weight != 1.0:
        adv = torch.where(pushed_down, adv * cfg.neg_weight, adv)
    terms = policy_terms(logp, behaviour, adv, mask, stale, cfg, proximal_logp)
    total = terms.loss.sum()
    sums = {"policy_loss": float(terms.loss.detach().sum())}
    if distill is not None:
        d = distill * mask
        scale = denom / distill_tokens if cfg.opd_norm == "teacher" and distill_tokens else 1.0
        total = total + cfg.w_opd * scale * d.sum()
        sums["distill"] = float(d.detach().sum())
    if kl is not None:
        k = kl * mask
        if cfg.kl_on == "negative":
            k = k * pushed_down.to(k.dtype)
        elif cfg.kl_on == "start":
            k = k * span_starts(mask, cfg.kl_start_tokens)
        total = total + cfg.kl_coef * k.sum()
        sums["kl"] = float(k.detach().sum())
    if entropy is not None:
        ent = entropy * mask
        total = total - cfg.entropy_coef * ent.sum()
        sums["entropy"] = float(ent.detach().sum())
    if flat is not None:
        f = flat * mask
        total = total + cfg.flat_coef * f.sum()
        sums["flat"] = float(f.detach().sum())
    on = mask > 0
    sums.update(
        tokens=float(on.sum()),
        clipped=float(terms.clipped.sum()),
        ratio_sum=float(terms.ratio[on].sum()),
        ratio_max=float(terms.ratio[on].max()) if on.any() else 1.0,
        ratio_min=float(terms.ratio[on].min()) if on.any() else 1.0,
        adv_sum=float(adv[on].sum()),
        adv_sq_sum=float((adv[on] ** 2).sum()),
        is_weight_sum=float(terms.is_weight[on].sum()),
    )
    return MicroLoss(total / denom, sums)
