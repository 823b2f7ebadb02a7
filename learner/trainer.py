"""The DeepSpeed side of the learner: model (full or LoRA), engine, one optimizer step, save/restore.

One process, one DeepSpeed engine. On CPU it runs single-process with the gloo backend and
``DS_ACCELERATOR=cpu`` (LoRA by default: a full SmolLM2-135M step is ~15 s on two cores); on
GPU it trains the full weights unless told otherwise. A torch AdamW and a LambdaLR schedule
are handed to ``deepspeed.initialize`` so ZeRO 0/1/2 save and reload them with the weights.

Save layout (under one checkpoint directory, uploaded as is):

- ``weights/``: what the serving tier loads. LoRA: the peft adapter only
  (``adapter_config.json`` + ``adapter_model.safetensors``). Full: a Hugging Face directory
  (``config.json`` + safetensors + tokenizer files) that ``from_pretrained`` loads.
- ``train_state/``: DeepSpeed's checkpoint (optimizer, scheduler, step, client state; for LoRA
  without the frozen base). Only a resuming learner needs it.

Before a step the policy's own greedy answers to some of its contexts are checked for loops
(learner.loop_guard); the repeats of a looping one are pushed down in the same step. With
`loop_guard.after` the same contexts are answered again by the updated weights, and a loop
found there gets one more pass of the step before the weights can be published.

Knows nothing about Kafka or the object store.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from infra.errors import LearnerError
from infra.settings import LearnerSettings
from learner.approved import ApprovedMemory, replay_batch
from learner.batching import Batch
from learner.losses import (RewardWindow, advantages, balanced_weights, entropy_from_logits, flatness, full_kl,
                            k3_kl, micro_batch_loss, normalisation_keys, opd_term, sample_rewards, span_starts,
                            topk_direction, topk_kl, unlikelihood)
from learner.loop_guard import ContextMemory, LoopBatch, LoopGuard
from schemas.methods import rule

DS_TAG = "ds"
REWARD_WINDOW = "reward_window"   # the running baseline's rewards, in the checkpoint's client state
LOOP_MEMORY = "loop_guard_memory"  # the loop guard's remembered contexts, likewise
APPROVED_MEMORY = "approved_memory"  # the approved answers trained again (learner.approved), likewise
ANSWERS_TRAINED = "teacher_answers_trained"  # how many teacher answers the fade has counted, likewise
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")


class Guide(NamedTuple):
    """What a guided teacher term is taken against (`Trainer._guide`), [B, T-1-start, K] each:
    the base's logprobs of the teacher's top-K ids, and the policy's own where it is the anchor."""

    base_top: torch.Tensor
    anchor_top: torch.Tensor | None


def decoder(model_path: Path) -> Callable[[list[int]], str] | None:
    """Token ids -> text with the model's own tokenizer, so the loop guard can read sentences;
    None where the model directory holds no tokenizer (the guard then reads token n-grams only)."""
    if not (Path(model_path) / "tokenizer.json").exists() and not (Path(model_path) / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise LearnerError(f"cannot load the tokenizer in {model_path}: {exc}") from exc
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> Any:
    """Import deepspeed for `device` and join (or form) the process group; returns the module.

    Launched by the deepspeed launcher the rank variables are already set; run by hand we are
    rank 0 of 1. DS_ACCELERATOR must be set before deepspeed is first imported.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # A group of one (run by hand, or a child that inherited a parent's variables) never
    # rendezvouses over a port; only a launcher's WORLD_SIZE > 1 does.
    alone = os.environ.get("WORLD_SIZE", "1") == "1"
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    import deepspeed

    if not torch.distributed.is_initialized():
        backend = "gloo" if device.type == "cpu" else "nccl"
        if alone:
            # A group of one needs no rendezvous port: a file store cannot race another
            # learner (or any client socket) for a "free" port between probe and bind.
            store = tempfile.NamedTemporaryFile(prefix="nextstate-pg-", delete=False)
            store.close()
            os.unlink(store.name)
            # Formed here rather than by DeepSpeed, whose CPU path rendezvouses over env://.
            torch.distributed.init_process_group(backend, init_method=f"file://{store.name}",
                                                 rank=0, world_size=1)
            deepspeed.init_distributed(dist_backend=backend)
        else:
            deepspeed.init_distributed(dist_backend=backend)
    return deepspeed


def _constant(step: int, warmup: int, total: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def _cosine(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))


LR_SCHEDULES = {"constant": _constant, "cosine": _cosine, "linear": _linear}
# how a teacher's own answer's advantage is spread over its tokens (learner.teacher_answer_credit):
# the same on each, or by the teacher's lead over the policy (`Trainer._answer_gap`)
ANSWER_CREDITS = ("flat", "gap")


def ds_config(ls: LearnerSettings, bf16: bool) -> dict[str, Any]:
    return {
        # Micro-batches vary in size (token budget); DeepSpeed only uses this for its logs.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ls.grad_accum,
        "gradient_clipping": ls.grad_clip,
        "zero_optimization": {"stage": ls.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Trainer:
    """A model under a DeepSpeed engine that trains one step from collated micro-batches."""

    def __init__(self, ls: LearnerSettings, model_path: Path) -> None:
        from transformers import AutoModelForCausalLM

        if ls.zero_stage == 3:
            raise LearnerError("zero_stage 3 is not supported: weights are saved with "
                               "save_pretrained, which needs unpartitioned parameters (use 0-2)")
        self.settings = ls
        self.model_path = Path(model_path)
        self.device = resolve_device(ls.device)
        if self.device.type == "cpu" and ls.cpu_threads is not None:
            torch.set_num_threads(ls.cpu_threads)   # process-wide, like the serving engine's
        self.lora = ls.uses_lora(self.device.type)
        bf16 = ls.bf16 if ls.bf16 is not None else self.device.type == "cuda"
        self.rule = rule(ls.method)
        normalisation_keys([], [], ls.adv_norm)  # fail at start, not at the first step
        self.reward_window = RewardWindow(ls.adv_window)
        self.answers_trained = 0   # the hinted teacher's answers trained so far (teacher_answers_halflife)
        self.loss_base = ls.loss_for(self.device.type)
        if self.loss_base.balance == "approval" and ls.adv_norm != "running":
            raise LearnerError(f"learner.loss.balance=approval reads the running baseline's window of "
                               f"verdicts; it needs adv_norm=running, not {ls.adv_norm!r}")
        self.loss_cfg = self.loss_base   # the step's: w_rl and w_opd may move with loss.balance
        self.topk = topk_direction(self.loss_cfg.opd_form) if self.rule.teacher_term else None
        deepspeed = init_distributed(self.device)
        torch.manual_seed(ls.seed)
        try:
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise LearnerError(f"cannot load base model from {self.model_path}: {exc}") from exc
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.ref_model = None
        if self.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=ls.lora_rank, lora_alpha=ls.lora_alpha,
                                                     target_modules="all-linear", lora_dropout=0.0))
        elif self.loss_cfg.kl_coef > 0 or self._guided() or self.loss_cfg.flat_coef > 0:
            # Full fine-tuning needs its own frozen copy of the base for the KL reference (the
            # teacher's guidance, the flatness term); with LoRA it is the same model with the
            # adapter off.
            self.ref_model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
            self.ref_model.requires_grad_(False).eval().to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.lr = ls.learning_rate(self.device.type)
        self.epochs = ls.updates_per_step(self.device.type)
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=ls.weight_decay)
        schedule = LR_SCHEDULES[ls.lr_schedule]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: schedule(step, ls.warmup_steps, ls.total_steps))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(ls, bf16))
        # DeepSpeed clips fp32 gradients without ZeRO but keeps no norm of them
        # (get_global_grad_norm() stays None): the trainer takes it itself there.
        self._params = params
        self._own_grad_norm = not bf16 and ls.zero_stage == 0
        self.trainable_params = sum(p.numel() for p in params)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = model.config.eos_token_id if eos is None else eos
        self.loop_guard = LoopGuard(ls.loop_guard, self.pad_id,
                                    [] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                                    decoder(self.model_path))
        self.approved = ApprovedMemory(ls.approved.keep, ls.token_budget)

    # -- forward --------------------------------------------------------------------------

    def _logits(self, module: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """(logits at the positions that predict a trained token, the first such position).

        The vocabulary projection of every prompt position would be thrown away: with a 49k
        vocabulary it is most of a step's memory. Logits start at the batch's first trained
        target (`logits_to_keep`); everything aligned to targets is padded back in front."""
        trained = batch.mask.any(0).nonzero()
        start = int(trained[0]) if len(trained) else batch.mask.shape[1]
        keep = batch.input_ids.shape[1] - start   # positions start..T-1; the last predicts nothing
        out = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep)
        return out.logits[:, :-1].float(), start

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, start: int, batch: Batch,
                        lse: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T-1] logprob of each target token (0 before `start`, where nothing is trained)."""
        targets = batch.input_ids[:, 1 + start:].unsqueeze(-1)
        lse = torch.logsumexp(logits, dim=-1) if lse is None else lse
        logp = logits.gather(-1, targets).squeeze(-1) - lse
        return torch.nn.functional.pad(logp, (start, 0))

    def _guided(self) -> bool:
        """Whether the teacher term is guided (`loss.opd_guidance`): it needs the base's logprobs."""
        return self.topk is not None and self.loss_cfg.opd_guidance > 0

    def _distill(self, logits: torch.Tensor, lse: torch.Tensor, start: int, batch: Batch,
                 guide: Guide | None = None) -> torch.Tensor | None:
        """[B, T-1] top-K KL to the teacher at every position (0 where a sample has no rows),
        or None when the loss does not use the teacher's distribution or no sample carries one.
        `guide` (`_guide`): the base's logprobs of the teacher's ids, and the policy's own at the
        step's first pass where the guidance moves the policy (`loss.opd_anchor=policy`)."""
        if self.topk is None or not bool(batch.has_top.any()):
            return None
        ids, valid = batch.top_ids[:, start:], batch.top_valid[:, start:]
        student = logits.gather(-1, ids) - lse.unsqueeze(-1)
        teacher, cfg = batch.top_logprobs[:, start:], self.loss_cfg
        guide = dict(base_top=guide.base_top if guide else None,
                     anchor_top=guide.anchor_top if guide else None,
                     guidance=cfg.opd_guidance, cap=cfg.opd_guidance_cap)
        kl = topk_kl(student, teacher, valid, self.topk, cfg.opd_temperature, **guide)
        if cfg.opd_temperature != 1.0 and cfg.opd_temperature_tokens:
            # tempered at each response's first tokens only, as taken at the rest
            first = span_starts(batch.mask[:, start:], cfg.opd_temperature_tokens).bool()
            kl = torch.where(first, kl, topk_kl(student, teacher, valid, self.topk, **guide))
        return torch.nn.functional.pad(kl, (start, 0))

    def _base_logits(self, batch: Batch) -> torch.Tensor:
        """The base model's logits on `batch` (`_logits`, same start), without gradient: the
        adapter switched off with LoRA, the frozen copy otherwise."""
        with torch.no_grad():
            if self.lora:
                with self.engine.module.disable_adapter():
                    return self._logits(self.engine, batch)[0]
            return self._logits(self.ref_model, batch)[0]

    def _guide(self, batch: Batch, start: int, logits: torch.Tensor, lse: torch.Tensor,
               base: torch.Tensor | None = None) -> Guide | None:
        """For the guided teacher term, [B, T-1-start, K] each: the base's logprobs of the
        teacher's top-K ids in the student's context and, with `loss.opd_anchor=policy`, the
        policy's own (from `logits`, the step's first pass; no gradient). None when it is off or
        no sample has rows. Taken on a step's first pass and kept for the later ones: the base
        does not change within a step, and the policy's target must not move with it. `base`:
        the base's logits on `batch`, where the pass has them already."""
        if not self._guided() or not bool(batch.has_top.any()):
            return None
        ids = batch.top_ids[:, start:]
        base = self._base_logits(batch) if base is None else base
        anchor = None
        if self.loss_cfg.opd_anchor == "policy":
            anchor = (logits.gather(-1, ids) - lse.unsqueeze(-1)).detach()
        return Guide(base.gather(-1, ids) - torch.logsumexp(base, dim=-1, keepdim=True), anchor)

    def _reference(self, batch: Batch, start: int, base: torch.Tensor | None = None) -> torch.Tensor:
        """The reference's side of the KL (`loss.kl_form`, `loss.kl_on`): the base's logprob of
        each target token (k3), or its log-softmax rows where the KL is counted (full). The
        base is the adapter switched off with LoRA, the frozen copy otherwise; `base`: its
        logits on `batch`, where the pass has them already (`_base_logits`)."""
        ref = self._base_logits(batch) if base is None else base   # same batch: same start
        with torch.no_grad():
            if self.loss_cfg.kl_form == "k3":
                return self._token_logprobs(ref, start, batch)
            if self.loss_cfg.kl_on == "start":
                # only the rows the term counts: a response's first tokens, not [B, T, V]
                ref = ref[span_starts(batch.mask[:, start:], self.loss_cfg.kl_start_tokens).bool()]
            return torch.log_softmax(ref, dim=-1)

    def _reference_kept(self) -> bool:
        """Whether a step keeps its reference tensors from the first pass for the later ones
        (the base does not change within a step): not the every-position rows, [B, T, V] each."""
        return self.loss_cfg.kl_form == "k3" or self.loss_cfg.kl_on == "start"

    def _reference_kl(self, logits: torch.Tensor, lse: torch.Tensor, logp: torch.Tensor,
                      start: int, batch: Batch, ref: torch.Tensor) -> torch.Tensor:
        """[B, T-1] KL to the reference (`_reference`) at every position it is counted, 0 elsewhere;
        the gradient flows through the policy's side."""
        if self.loss_cfg.kl_form == "k3":
            return k3_kl(logp, ref, batch.mask)
        if self.loss_cfg.kl_on == "start":
            rows = span_starts(batch.mask[:, start:], self.loss_cfg.kl_start_tokens).bool()
            kl = torch.zeros_like(lse)
            kl[rows] = full_kl(logits[rows], lse[rows], ref)
        else:
            kl = full_kl(logits, lse, ref)
        return torch.nn.functional.pad(kl, (start, 0))

    # -- one optimizer step ---------------------------------------------------------------

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """`epochs` times: forward/backward every micro-batch, then one optimizer update. The
        metrics are the first pass's (the policy that met these samples) and the last pass's
        policy loss, ratio and clip fraction as ``last_*``. A step whose loss cannot depend on
        the weights (`_has_signal`) is not run: metric ``skipped`` is 1."""
        if not micro_batches:
            raise LearnerError("train_step() got no micro-batches")
        started = time.perf_counter()
        cfg, ls = self.loss_cfg, self.settings
        batches = [b.to(self.device) for b in micro_batches]
        rewards = torch.cat([b.rewards for b in batches])
        # the hinted teacher's own answers at the weight this run gives them (learner.teacher_answers),
        # faded by the ones trained before (teacher_answers_halflife)
        answer_weight = self.answer_weight()
        precomputed = torch.cat([torch.where(b.answer, b.advantage * answer_weight, b.advantage)
                                 for b in batches])
        normed = sample_rewards(rewards, precomputed,
                                torch.cat([b.has_advantage for b in batches]),
                                [g for b in batches for g in b.task_groups],
                                [s for b in batches for s in b.step_indices], ls.adv_norm, cfg.eps,
                                self.reward_window).split([len(b.rewards) for b in batches])
        verdicts, balance = self._balance()
        if verdicts != 1.0:   # the users' verdicts only: revisions, answers, group advantages keep theirs
            normed = tuple(torch.where(b.has_advantage.bool().to(r.device), r, r * verdicts)
                           for b, r in zip(batches, normed))
        if not self._has_signal(batches, normed):
            return self._still_metrics(batches, rewards, started)
        looping, guarded, prompts = (self.loop_guard.check(self.engine.module, batches, self.device)
                                     if self.loop_guard.on else (None, {}, []))
        own = batches
        if self._replays():
            answers = self.approved.draw(ls.approved.replay)
            if answers:
                extra = replay_batch(answers, self.pad_id, ls.approved.advantage).to(self.device)
                batches, normed = [*batches, extra], (*normed, extra.advantage)
        proximal: list[torch.Tensor] = []
        refs: list[torch.Tensor | None] = []
        bases: list[Guide | None] = []
        base_h: list[torch.Tensor] = []
        totals = self._pass(batches, normed, proximal, refs, bases, base_h, looping)
        last = totals
        for _ in range(self.epochs - 1):
            last = self._pass(batches, normed, proximal, refs, bases, base_h, looping)
        if prompts and self.settings.loop_guard.after > 0:
            last = self._repair(prompts, batches, normed, proximal, refs, bases, base_h, guarded, last)
        elapsed = time.perf_counter() - started
        metrics = self._step_metrics(totals, own, rewards, elapsed)
        metrics.update(guarded, **balance)
        if self._replays():
            new = self.approved.note(own)   # from the next step on
            replayed = batches[len(own):]
            metrics.update(approved_replayed=float(sum(len(b.rewards) for b in replayed)),
                           approved_tokens=float(sum(int(b.mask.sum()) for b in replayed)),
                           approved_new=float(new), approved_kept=float(len(self.approved)))
        metrics["skipped"] = 0.0   # every step sets it: a gauge must not keep a skipped step's 1
        if ls.teacher_answers_halflife > 0:
            metrics["teacher_answer_weight"] = answer_weight
        self.answers_trained += int(metrics["teacher_answers"])
        if self.epochs > 1:
            n = max(last["tokens"], 1.0)
            if "grad_norm" in last:
                metrics["last_grad_norm"] = last["grad_norm"]
            metrics.update(epochs=float(self.epochs), last_policy_loss=last["policy_loss"] / n,
                           last_ratio_mean=last["ratio_sum"] / n, last_clip_frac=last["clipped"] / n)
            if "distill" in last:
                metrics["last_distill_kl"] = last["distill"] / n
        return metrics

    def answer_weight(self) -> float:
        """The advantage of the teacher's own answers this step: `learner.teacher_answers`, halved
        for every `teacher_answers_halflife` of them trained before it (whole when that is 0).
        Early on the hinted teacher's answers show the policy where the hint points; later they hold
        it near a teacher that meets the preference only as often as it does, while the users'
        verdicts and the teacher term go on."""
        ls = self.settings
        if ls.teacher_answers_halflife <= 0:
            return ls.teacher_answers
        return ls.teacher_answers * 0.5 ** (self.answers_trained / ls.teacher_answers_halflife)

    def _replays(self) -> bool:
        """Whether steps train remembered approved answers again (learner.approved): a method
        with a reward term, `approved.replay` above 0."""
        return self.rule.reward_term and self.settings.approved.replay > 0

    def _repair(self, prompts: list[list[int]], batches: list[Batch], normed: tuple[torch.Tensor, ...],
                proximal: list[torch.Tensor], refs: list[torch.Tensor | None], bases: list[Guide | None],
                base_h: list[torch.Tensor], guarded: dict[str, float], last: dict[str, float]) -> dict[str, float]:
        """The guard's prompts answered again by the updated weights (`LoopGuard.recheck`); while
        some loop, one more pass of the step with those repeats pushed down and another recheck,
        up to `loop_guard.after` passes, so the weights this step publishes are checked ones. The
        last pass's sums (the repaired one where there was one). `guarded` gets the loops the
        step made (the first recheck), the repair passes, and the loops left in the weights that
        go out (the last recheck)."""
        made = left = repairs = 0.0
        for i in range(self.settings.loop_guard.after + 1):
            looping, m = self.loop_guard.recheck(self.engine.module, prompts, self.device)
            guarded["loop_guard_s"] = guarded.get("loop_guard_s", 0.0) + m["loop_guard_s"]
            made, left = (m["loop_guard_loops"] if i == 0 else made), m["loop_guard_loops"]
            if looping is None or i == self.settings.loop_guard.after:
                break
            last = self._pass(batches, normed, proximal, refs, bases, base_h, looping)
            repairs += 1
        guarded.update(loop_guard_after_loops=made, loop_guard_repairs=repairs, loop_guard_left_loops=left)
        return last

    def _has_signal(self, batches: list[Batch], normed: tuple[torch.Tensor, ...]) -> bool:
        """Whether the step carries signal: a nonzero advantage on a trained token or a teacher
        distribution. A personal agent's step whose answers all got the same verdict has none
        (its normalised rewards are 0). Such a step must not reach the optimizer: with a zero
        gradient Adam still moves every weight along its momentum, so a run that cannot learn a
        preference would drift anyway. The KL and entropy terms only regularise what a signal
        moves: alone they do not make a step (which keeps the weights, and the served model's
        prefix cache, as they were)."""
        cfg = self.loss_cfg
        for batch, r in zip(batches, normed):
            if self.topk is not None and bool(batch.has_top.any()):
                return True
            adv = advantages(self.rule, r, batch.teacher, batch.behaviour, batch.has_teacher, cfg)
            if bool((adv * batch.mask).ne(0).any()):
                return True
        return False

    def _still_metrics(self, batches: list[Batch], rewards: torch.Tensor, started: float) -> dict[str, float]:
        """The metrics of a step without signal: nothing trained, weights and optimizer untouched."""
        tokens = float(sum(int(b.mask.sum()) for b in batches))
        zeros = dict(tokens=tokens, policy_loss=0.0, clipped=0.0, ratio_sum=tokens, ratio_max=1.0,
                     ratio_min=1.0, adv_sum=0.0, adv_sq_sum=0.0, is_weight_sum=tokens)
        metrics = self._step_metrics(zeros, batches, rewards, time.perf_counter() - started)
        metrics.update(grad_norm=0.0, trained_tokens=0.0, skipped=1.0)
        return metrics

    def _pass(self, batches: list[Batch], normed: tuple[torch.Tensor, ...],
              proximal: list[torch.Tensor], refs: list[torch.Tensor | None],
              bases: list[Guide | None], base_h: list[torch.Tensor],
              looping: LoopBatch | None = None) -> dict[str, float]:
        """One forward/backward over every micro-batch (`normed`: each one's reward terms) and
        one optimizer update; the sums. The first pass fills `proximal` with its logprobs, which
        later passes use as the stale samples' proximal policy, and `refs` with the KL's
        reference side where it is kept (`_reference_kept`), and `bases` with what the guided
        teacher term is taken against (`_guide`), and `base_h` with the base's entropy at every
        position where the flatness term is on (`loss.flat_coef`). `looping`: the policy's looping
        greedy answers (learner.loop_guard), their repeats pushed down in every pass."""
        cfg = self.loss_cfg
        step_tokens = int(sum(int(b.mask.sum()) for b in batches))
        teacher_tokens = self._teacher_tokens(batches)
        totals: dict[str, float] = {"teacher_tokens": float(teacher_tokens)}
        self.engine.train()
        if looping is not None:
            # before the micro-batches, so the last of them still closes the accumulation
            self.engine.set_gradient_accumulation_boundary(False)
            logits, start = self._logits(self.engine, looping)
            ul = unlikelihood(self._token_logprobs(logits, start, looping), looping.mask)
            self.engine.backward(self.settings.loop_guard.coef * ul.sum() / max(step_tokens, 1),
                                 scale_wrt_gas=False)
            totals.update(unlikelihood=float(ul.detach().sum()), unlikely_tokens=float(looping.mask.sum()))
        for i, (batch, r) in enumerate(zip(batches, normed)):
            self.engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
            logits, start = self._logits(self.engine, batch)
            lse = torch.logsumexp(logits, dim=-1)
            logp = self._token_logprobs(logits, start, batch, lse)
            base = None
            if len(bases) <= i:
                if cfg.flat_coef > 0 or (cfg.kl_coef > 0 and self._guided() and bool(batch.has_top.any())):
                    # one base forward for the guide, the KL and the flatness term
                    base = self._base_logits(batch)
                bases.append(self._guide(batch, start, logits, lse, base))
                if cfg.flat_coef > 0:
                    base_h.append(torch.nn.functional.pad(entropy_from_logits(base), (start, 0)))
            distill = self._distill(logits, lse, start, batch, bases[i])
            # a sample whose teacher term is its KL to the teacher's top-K gets no sampled-token gap
            token_teacher = batch.has_teacher * (1 - batch.has_top) if distill is not None else batch.has_teacher
            adv = advantages(self.rule, r, batch.teacher, batch.behaviour, token_teacher, cfg)
            if self.settings.teacher_answer_credit == "gap" and bool(batch.answer.any()):
                adv = self._answer_gap(adv, batch, proximal[i] if len(proximal) > i else logp.detach(),
                                       totals if len(proximal) <= i else None)
            kl = None
            if cfg.kl_coef > 0:
                if len(refs) <= i:
                    refs.append(self._reference(batch, start, base) if self._reference_kept() else None)
                ref = refs[i] if refs[i] is not None else self._reference(batch, start, base)
                kl = self._reference_kl(logits, lse, logp, start, batch, ref)
            ent = (torch.nn.functional.pad(entropy_from_logits(logits), (start, 0))
                   if cfg.entropy_coef > 0 or cfg.flat_coef > 0 else None)
            flat = None
            if cfg.flat_coef > 0:
                flat = flatness(ent, base_h[i], cfg.flat_margin)
                totals["entropy_gap"] = (totals.get("entropy_gap", 0.0)
                                         + float(((ent.detach() - base_h[i]) * batch.mask).sum()))
            first = len(proximal) <= i
            if first:
                proximal.append(logp.detach())
            behaviour, stale = batch.behaviour, batch.stale
            own_policy = batch.revision | batch.replayed
            if bool(own_policy.any()):
                # a hindsight revision's tokens were sampled under another context, a replayed
                # approved answer's by an earlier policy: their behaviour policy here is the first
                # pass's (ratio 1 then, the clip bounds the later passes, no importance weight)
                behaviour = torch.where(own_policy[:, None], proximal[i], behaviour)
                stale = stale | own_policy
            part = micro_batch_loss(logp, behaviour, adv, batch.mask, stale,
                                    step_tokens, cfg, kl=kl, entropy=ent if cfg.entropy_coef > 0 else None,
                                    distill=distill, flat=flat,
                                    proximal_logp=None if first else proximal[i],
                                    distill_tokens=teacher_tokens)
            # The loss is already divided by the step's token count: no further /grad_accum.
            self.engine.backward(part.loss, scale_wrt_gas=False)
            for k, v in part.sums.items():
                if k == "ratio_max":
                    totals[k] = max(totals.get(k, v), v)
                elif k == "ratio_min":
                    totals[k] = min(totals.get(k, v), v)
                else:
                    totals[k] = totals.get(k, 0.0) + v
        if self._own_grad_norm:
            # before the clip, as DeepSpeed's own norm is
            totals["grad_norm"] = float(torch.nn.utils.get_total_norm(
                [p.grad for p in self._params if p.grad is not None]))
        self.engine.step()
        return totals

    def _answer_gap(self, adv: torch.Tensor, batch: Batch, policy: torch.Tensor,
                    totals: dict[str, float] | None) -> torch.Tensor:
        """`adv` with the hinted teacher's own answers' rows spread by the teacher's lead
        (learner.teacher_answer_credit "gap"): each token's advantage times clip(teacher −
        policy, ±loss.opd_clip), the teacher's logprob of the token under the hint (the answer's
        behaviour logprobs, as the hint stage's teacher wrote it) over `policy`'s, the step's
        first pass, so the advantage does not change between passes. A token the policy already
        gives as much as the teacher does is not pushed; one it gives more is pushed down.
        `totals` (the first pass only) gets the lead's sum over the answers' tokens."""
        gap = opd_term(batch.behaviour, policy, self.loss_cfg.opd_clip)
        rows = batch.answer[:, None]
        if totals is not None:
            counted = rows & batch.mask.bool()
            totals["answer_gap"] = totals.get("answer_gap", 0.0) + float(gap[counted].sum())
            totals["answer_tokens"] = totals.get("answer_tokens", 0.0) + float(counted.sum())
        return torch.where(rows, adv * gap, adv)

    def _balance(self) -> tuple[float, dict[str, float]]:
        """Under ``loss.balance=approval``, with s the share of approvals in the running window
        (which already holds this step's verdicts): the factor on the users' verdicts' reward
        terms, min(1, 2s), and this step's loss knobs with the teacher term's weight times
        min(1, 2(1 − s)) (learner.losses.balanced_weights); and the metrics that say so. Samples
        whose advantage came with them (revisions, the teacher's answers, group advantages) keep
        theirs, and a method with one of the terms keeps its weight."""
        base = self.loss_base
        if base.balance != "approval" or not (self.rule.reward_term and self.rule.teacher_term):
            return 1.0, {}
        share = self.reward_window.approval()
        verdicts, w_opd = balanced_weights(1.0, base.w_opd, share)
        self.loss_cfg = base.model_copy(update={"w_opd": w_opd})
        return verdicts, {"verdict_weight": verdicts, "w_opd": w_opd,
                          **({"approval_share": share} if share is not None else {})}

    def _teacher_tokens(self, batches: list[Batch]) -> int:
        """The step's trained tokens of samples whose teacher term is the top-K KL."""
        if self.topk is None:
            return 0
        return int(sum(int((b.mask * b.has_top[:, None]).sum()) for b in batches))

    def _step_metrics(self, t: dict[str, float], batches: list[Batch], rewards: torch.Tensor,
                      elapsed: float) -> dict[str, float]:
        n = max(t["tokens"], 1.0)
        # the teacher term's divisor (learner.loss.opd_norm)
        nd = max(t.get("teacher_tokens", 0.0), 1.0) if self.loss_cfg.opd_norm == "teacher" else n
        adv_mean = t["adv_sum"] / n
        seq_tokens = sum(b.tokens for b in batches)
        revised = torch.cat([b.revision for b in batches]).to(rewards.device)
        answers = torch.cat([b.answer for b in batches]).to(rewards.device)
        grad_norm = t["grad_norm"] if "grad_norm" in t else self.engine.get_global_grad_norm()
        metrics = {
            "loss": (t["policy_loss"] + self.loss_cfg.kl_coef * t.get("kl", 0.0)
                     + self.settings.loop_guard.coef * t.get("unlikelihood", 0.0)
                     + self.loss_cfg.flat_coef * t.get("flat", 0.0)
                     - self.loss_cfg.entropy_coef * t.get("entropy", 0.0)) / n
                    + self.loss_cfg.w_opd * t.get("distill", 0.0) / nd,
            "policy_loss": t["policy_loss"] / n,
            # the judged answers' rewards: a revision repeats its approved answer's
            "reward_mean": float(rewards[~revised].mean()) if bool((~revised).any()) else 0.0,
            "revisions": float((revised & ~answers).sum()),
            "teacher_answers": float(answers.sum()),
            "adv_mean": adv_mean,
            "adv_std": math.sqrt(max(0.0, t["adv_sq_sum"] / n - adv_mean ** 2)),
            "ratio_mean": t["ratio_sum"] / n,
            "ratio_max": t["ratio_max"],
            "ratio_min": t["ratio_min"],
            "clip_frac": t["clipped"] / n,
            "is_weight_mean": t["is_weight_sum"] / n,
            "samples": float(len(rewards)),
            "micro_batches": float(len(batches)),
            "trained_tokens": t["tokens"],
            "tokens": float(seq_tokens),
            "step_s": elapsed,
            "tokens_per_s": seq_tokens / elapsed if elapsed > 0 else 0.0,
            "lr": float(self.scheduler.get_last_lr()[0]),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if "kl" in t:
            metrics["kl"] = t["kl"] / n
        if "entropy" in t:
            metrics["entropy"] = t["entropy"] / n
        if "flat" in t:
            # per trained token: the term's excess, and how much flatter than the base the policy is
            metrics["flat"] = t["flat"] / n
            metrics["entropy_gap"] = t["entropy_gap"] / n
        if "distill" in t:
            metrics["distill_kl"] = t["distill"] / n
            metrics["teacher_tokens"] = t["teacher_tokens"]
        if "answer_gap" in t:
            # per token of the teacher's own answers: its logprob over the policy's (teacher_answer_credit gap)
            metrics["teacher_answer_gap"] = t["answer_gap"] / max(t["answer_tokens"], 1.0)
        if "unlikelihood" in t:
            # per pushed-down token (their count beside it)
            metrics["unlikelihood"] = t["unlikelihood"] / max(t["unlikely_tokens"], 1.0)
            metrics["unlikely_tokens"] = t["unlikely_tokens"]
        return metrics

    # -- save / restore -------------------------------------------------------------------

    def save(self, directory: Path, client_state: dict[str, Any]) -> Path:
        """Write weights/ and train_state/ under `directory` (replaced if it exists)."""
        directory = Path(directory)
        if directory.exists():
            shutil.rmtree(directory)
        weights = directory / "weights"
        self.engine.module.save_pretrained(weights)
        if not self.lora:
            for name in TOKENIZER_FILES:
                if (self.model_path / name).exists():
                    shutil.copy2(self.model_path / name, weights / name)
        self.engine.save_checkpoint(str(directory / "train_state"), tag=DS_TAG,
                                    client_state={**client_state, REWARD_WINDOW: list(self.reward_window.values),
                                                  LOOP_MEMORY: self.loop_guard.memory.state(),
                                                  APPROVED_MEMORY: self.approved.state(),
                                                  ANSWERS_TRAINED: self.answers_trained},
                                    exclude_frozen_parameters=self.lora)
        return directory

    def restore(self, directory: Path) -> dict[str, Any]:
        """Load weights, optimizer and scheduler from a directory `save` wrote; its client state."""
        path, client_state = self.engine.load_checkpoint(
            str(Path(directory) / "train_state"), tag=DS_TAG,
            load_module_strict=not self.lora, load_optimizer_states=True,
            load_lr_scheduler_states=True)
        if path is None:
            raise LearnerError(f"no DeepSpeed checkpoint under {directory}/train_state")
        client_state = client_state or {}
        self.reward_window = RewardWindow(self.settings.adv_window, client_state.get(REWARD_WINDOW, ()))
        self.loop_guard.memory = ContextMemory(self.settings.loop_guard.memory, client_state.get(LOOP_MEMORY, ()))
        self.approved = ApprovedMemory(self.settings.approved.keep, self.settings.token_budget,
                                       client_state.get(APPROVED_MEMORY, ()))
        self.answers_trained = int(client_state.get(ANSWERS_TRAINED, 0))
        return client_state
