"""Agreement between two reward streams over the same transitions (a live judge and a
replayed one, or two judges side by side): a confusion table of majorities, the share that
agree, and Cohen's kappa. Pure: takes events, returns numbers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from schemas.events import RewardJudged

SCORES = (1, 0, -1)


@dataclass(frozen=True)
class Agreement:
    pairs: int                              # transitions judged in both streams
    only_left: int
    only_right: int
    table: dict[tuple[int, int], int]       # (left majority, right majority) -> count

    @property
    def agree(self) -> float:
        return sum(n for (a, b), n in self.table.items() if a == b) / self.pairs if self.pairs else 0.0

    @property
    def kappa(self) -> float:
        """Cohen's kappa: agreement beyond what the two marginals give by chance."""
        if not self.pairs:
            return 0.0
        left = Counter({s: 0 for s in SCORES})
        right = Counter({s: 0 for s in SCORES})
        for (a, b), n in self.table.items():
            left[a] += n
            right[b] += n
        chance = sum(left[s] * right[s] for s in SCORES) / self.pairs ** 2
        return 1.0 if chance == 1 else (self.agree - chance) / (1 - chance)


def agreement(left: list[RewardJudged], right: list[RewardJudged]) -> Agreement:
    """Pair judgements by transition id (the newest of each side wins if it judged twice)."""
    a = {j.transition_id: j.majority for j in sorted(left, key=lambda j: j.occurred_at)}
    b = {j.transition_id: j.majority for j in sorted(right, key=lambda j: j.occurred_at)}
    both = a.keys() & b.keys()
    return Agreement(len(both), len(a.keys() - both), len(b.keys() - both),
                     dict(Counter((a[t], b[t]) for t in both)))
