"""Turns a sample source into optimizer steps: validate, judge staleness, fill micro-batches.

One call to `next_step` returns everything read for one step: the collated micro-batches
to train, and every record it *handled* (trained, importance-corrected, dropped as stale,
or dead-lettered as invalid) so the caller can advance its offsets past all of them at once.
A record that would overflow the step is kept back and starts the next one; it is the most
recent record read, so every handled record precedes it in its partition and the offsets
never skip it. Knows nothing about DeepSpeed or checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from infra.settings import LearnerSettings
from learner.batching import Batch, InvalidSample, StepCollector, collate, has_signal, validate
from learner.sources import Fed, SampleSource
from learner.staleness import StalenessCounter, Verdict, decide, policy
from schemas.methods import rule


@dataclass
class StepInput:
    batches: list[Batch] = field(default_factory=list)
    handled: list[Fed] = field(default_factory=list)
    verdicts: dict[str, list[str]] = field(default_factory=dict)  # verdict -> sample ids

    @property
    def idle(self) -> bool:
        return not self.handled

    def note(self, fed: Fed, verdict: str) -> None:
        self.handled.append(fed)
        self.verdicts.setdefault(verdict, []).append(fed.sample.event_id)


class StepFeeder:
    def __init__(self, source: SampleSource, ls: LearnerSettings, pad_id: int,
                 on_invalid: Callable[[Fed, InvalidSample], None],
                 poll_s: float = 0.2, max_handled: int = 4096, vocab_size: int | None = None) -> None:
        self.source = source
        self.vocab_size = vocab_size
        self.ls = ls
        self.pad_id = pad_id
        self.on_invalid = on_invalid
        self.poll_s = poll_s
        # A long run of dropped or invalid records still ends a step now and then, so that
        # offsets advance and checkpoints stay due.
        self.max_handled = max_handled
        self.rule = policy(ls.staleness_policy)
        self.method = rule(ls.method)
        self.staleness = StalenessCounter()
        self._carry: Fed | None = None

    def next_step(self, current_version: int) -> StepInput:
        """Read until the step is full, or `fill_timeout_s` passed since its first sample,
        or nothing arrived within one poll while the step is still empty."""
        step = StepInput()
        collector = StepCollector.empty(self.ls.token_budget, self.ls.grad_accum)
        stale: dict[str, bool] = {}
        deadline: float | None = None
        while len(step.handled) < self.max_handled:
            fed, self._carry = (self._carry, None) if self._carry else (self.source.poll(self.poll_s), None)
            if fed is None:
                if not collector.samples or (deadline is not None and time.monotonic() >= deadline):
                    break
                continue
            try:
                validate(fed.sample, self.vocab_size)
            except InvalidSample as exc:
                self.on_invalid(fed, exc)
                step.note(fed, "invalid")
                continue
            if not has_signal(fed.sample, self.method, self.ls.revisions, self.ls.teacher_answers):
                step.note(fed, "no_signal")   # valid, just nothing for this method: skip, count
                continue
            verdict, d = decide(self.rule, current_version, fed.sample.policy_version, self.ls.max_staleness)
            if verdict is not Verdict.DROP and not collector.add(fed.sample):
                self._carry = fed   # judged again when it opens the next step
                break
            self.staleness.count(verdict, d)
            if verdict is Verdict.DROP:
                step.note(fed, verdict.value)
                continue
            stale[fed.sample.event_id] = verdict is Verdict.CORRECT
            step.note(fed, verdict.value)
            deadline = deadline or time.monotonic() + self.ls.fill_timeout_s
            if collector.full():
                break
        step.batches = [collate(mb, self.pad_id, [stale[s.event_id] for s in mb])
                        for mb in collector.micro_batches()] if collector.samples else []
        return step
