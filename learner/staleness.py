"""Bounded staleness: what happens to a sample produced by a policy too many versions old.

The lag of a sample is ``current_version − sample.policy_version`` (version 0 is the base
model; the learner's version is its last published checkpoint's). Up to `max_staleness` the
sample trains normally. Beyond it the configured policy decides: ``drop`` it (counted, and
recorded in the trained ledger as dropped), or ``correct`` it (train it with the truncated
importance weight of `learner.losses`). Every decision is counted, and the lags of everything
seen form the staleness histogram. Pure: no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class Verdict(StrEnum):
    TRAIN = "train"        # fresh enough: PPO ratio against the behaviour policy
    CORRECT = "correct"    # stale: trained with a truncated importance weight
    DROP = "drop"          # stale: not trained, counted


StalePolicy = Callable[[int, int], Verdict]


def _drop(lag: int, max_staleness: int) -> Verdict:
    return Verdict.DROP if lag > max_staleness else Verdict.TRAIN


def _correct(lag: int, max_staleness: int) -> Verdict:
    return Verdict.CORRECT if lag > max_staleness else Verdict.TRAIN


POLICIES: dict[str, StalePolicy] = {"drop": _drop, "correct": _correct}


def policy(name: str) -> StalePolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown staleness policy {name!r}; known: {sorted(POLICIES)}") from None


def lag(current_version: int, sample_version: int) -> int:
    # A sample from a *newer* version than the learner's (a replay run trained on a live run's
    # samples) is not stale; its lag counts as 0.
    return max(0, current_version - sample_version)


def decide(rule: StalePolicy, current_version: int, sample_version: int, max_staleness: int) -> tuple[Verdict, int]:
    """The verdict on a sample and its lag (count it with StalenessCounter.count once it is used)."""
    d = lag(current_version, sample_version)
    return rule(d, max_staleness), d


@dataclass
class StalenessCounter:
    """Counts per verdict and a histogram of lags, for metrics and the checkpoint event."""

    verdicts: Counter = field(default_factory=Counter)
    lags: Counter = field(default_factory=Counter)

    def judge(self, rule: StalePolicy, current_version: int, sample_version: int,
              max_staleness: int) -> Verdict:
        verdict, d = decide(rule, current_version, sample_version, max_staleness)
        self.count(verdict, d)
        return verdict

    def count(self, verdict: Verdict, sample_lag: int) -> None:
        self.verdicts[verdict] += 1
        self.lags[sample_lag] += 1

    def histogram(self, buckets: tuple[int, ...] = (0, 1, 2, 4, 8)) -> dict[str, int]:
        """Lags folded into buckets named 'lag_le_<b>' plus 'lag_gt_<last>'."""
        out = {f"lag_le_{b}": 0 for b in buckets}
        out[f"lag_gt_{buckets[-1]}"] = 0
        for d, n in self.lags.items():
            name = next((f"lag_le_{b}" for b in buckets if d <= b), f"lag_gt_{buckets[-1]}")
            out[name] += n
        return out

    def reset(self) -> None:
        self.verdicts.clear()
        self.lags.clear()
