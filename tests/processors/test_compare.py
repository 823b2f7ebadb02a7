"""Agreement between reward streams, computed by hand."""

from __future__ import annotations

import pytest

from processors.compare import agreement
from schemas.events import RewardJudged


def _j(transition: str, majority: int) -> RewardJudged:
    return RewardJudged(tenant="t", session_id="s", turn_index=0, transition_id=transition, turn_id="u",
                        judge="x", judge_model="m", judge_version="1", prompt_sha256="0" * 64,
                        votes=[], majority=majority)


def test_agreement_table_and_kappa():
    left = [_j("a", 1), _j("b", 1), _j("c", -1), _j("d", -1), _j("only-left", 0)]
    right = [_j("a", 1), _j("b", -1), _j("c", -1), _j("d", -1), _j("only-right", 1)]
    got = agreement(left, right)
    assert (got.pairs, got.only_left, got.only_right) == (4, 1, 1)
    assert got.table == {(1, 1): 1, (1, -1): 1, (-1, -1): 2}
    assert got.agree == 0.75
    # marginals: left +1:2 -1:2, right +1:1 -1:3 -> chance (2*1 + 2*3)/16 = 0.5; kappa 0.25/0.5
    assert got.kappa == pytest.approx(0.5)


def test_no_overlap_is_not_a_division_by_zero():
    got = agreement([_j("a", 1)], [_j("b", 1)])
    assert got.pairs == 0 and got.agree == 0.0 and got.kappa == 0.0
