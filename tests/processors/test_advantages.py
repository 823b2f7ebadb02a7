"""Step-wise and outcome-only advantages by hand: buckets of one, equal buckets dropped,
population std, the kept bucket of an all-dropped group, GRPO, and the tool-call outcome."""

from __future__ import annotations

import math

import pytest

from processors.advantages import outcome_only, step_rewards, stepwise, toolcall_outcome
from processors.voting import vote_mean


def test_the_process_reward_is_the_mean_of_valid_plus_minus_one_votes():
    assert vote_mean([1, 1, -1]) == pytest.approx(1 / 3)
    assert vote_mean([1, None, 0]) == 1.0        # 0 and unreadable votes do not count
    assert vote_mean([None, 0]) == 0.0
    assert step_rewards(-1.0, [1.0, -1 / 3], c=0.5) == pytest.approx([-0.5, -1 - 1 / 6])


def test_buckets_are_group_and_step_with_population_std():
    # three rollouts; rollout 2 has a third step nobody else has
    got = stepwise({0: [1.0, 0.0], 1: [-1.0, 0.0], 2: [0.0, 0.0, 2.0]})
    # step 0: values 1, -1, 0 → mean 0, population std sqrt(2/3)
    std = math.sqrt(2 / 3)
    assert [got[k][0].advantage for k in (0, 1, 2)] == pytest.approx([1 / (std + 1e-6), -1 / (std + 1e-6), 0.0])
    assert {got[k][0].normaliser for k in got} == {"bucket"}
    # step 1: all equal → dropped, advantage 0, not trained
    assert all(got[k][1].advantage == 0.0 and not got[k][1].trained and got[k][1].normaliser == "dropped"
               for k in got)
    # step 2: a bucket of one keeps its raw reward
    assert got[2][2].advantage == 2.0 and got[2][2].normaliser == "single" and got[2][2].trained


def test_an_all_fail_group_still_has_nonzero_step_advantages_from_the_prm():
    # every rollout failed (o = -1), but the judge liked some steps: the buckets differ
    outcome = -1.0
    rewards = {k: step_rewards(outcome, p) for k, p in {0: [1.0, -1.0], 1: [-1.0, -1.0], 2: [1.0, 1.0]}.items()}
    got = stepwise(rewards)
    assert any(s.advantage != 0 for steps in got.values() for s in steps)
    assert all(o.advantage == 0 for o in sum(outcome_only({0: -1, 1: -1, 2: -1}, {0: 2, 1: 2, 2: 2}).values(), []))


def test_a_group_whose_every_bucket_is_dropped_keeps_its_first_step():
    got = stepwise({0: [0.5, 0.5], 1: [0.5, 0.5]})
    assert [(s.normaliser, s.trained, s.advantage) for s in got[0]] == [("kept", True, 0.0),
                                                                         ("dropped", False, 0.0)]


def test_outcome_only_is_grpo_broadcast_to_every_step():
    got = outcome_only({0: 1.0, 1: -1.0}, {0: 3, 1: 1})
    assert [s.advantage for s in got[0]] == pytest.approx([1 / (1 + 1e-6)] * 3)
    assert [s.advantage for s in got[1]] == pytest.approx([-1 / (1 + 1e-6)])
    assert outcome_only({0: 1.0}, {0: 2})[0][0].advantage == 0.0   # a group of one has no baseline


def test_toolcall_outcome_as_the_reference_sets_it():
    assert toolcall_outcome(True, 0) == 1.0
    assert toolcall_outcome(False, 0) == -1.0        # min(-0.6, -1.1)
    assert toolcall_outcome(False, 4) == pytest.approx(-0.9)
    assert toolcall_outcome(False, 20) == -0.6       # capped
    assert toolcall_outcome(False, 20, shaped=False) == -1.0
