"""The group stage's pure steps: a group's rollouts, in any arrival order, become samples with
the advantages of processors.advantages, once, and never wait past the deadline."""

from __future__ import annotations

import math
import random

import pytest

from infra.settings import GroupSettings
from processors import group as G
from processors.advantages import EPS
from schemas.events import (
    EpisodeEnd,
    EpisodeEnded,
    EpisodeRef,
    JudgeVote,
    NextStateKind,
    RewardJudged,
    TransitionFormed,
)
from tests.processors.helpers import turn


class Run:
    """A dict as the table; applies each step's writes and collects the samples."""

    def __init__(self, **settings) -> None:
        self.s = GroupSettings(**settings)
        self.table: dict = {}
        self.samples: list = []
        self.notes: list = []
        self.now = 1000.0

    def feed(self, event) -> None:
        if isinstance(event, TransitionFormed):
            step = G.on_transition(self.table, event, 0, self.now, self.s)
        elif isinstance(event, RewardJudged):
            step = G.on_judgement(self.table, event, 0, self.now, self.s)
        else:
            step = G.on_episode_end(self.table, event, 0, self.now, self.s)
        self._apply(step)

    def check(self) -> None:
        for key, value in list(self.table.items()):
            if G.needs_check(key, value, self.now, self.s):
                self._apply(G.on_check(self.table, key, self.now, self.s))

    def _apply(self, step) -> None:
        for k, v in step.writes.items():
            if v is None:
                self.table.pop(k, None)
            else:
                self.table[k] = v
        self.samples += step.outputs
        self.notes.append(step.note)


def rollout(group: str, k: int, process: list[float], outcome: float, attempt: int = 0,
            size: int = 3, first: int = 0) -> list:
    """Rollout k of `group`: one transition and one judgement per step (turn indices from
    `first`), then its end."""
    sid = f"{group}-a{attempt}-r{k}"
    ep = EpisodeRef(task_id=f"task-{group}", group_id=group, rollout_index=k, env="toolcall", attempt=attempt)
    events = []
    for t, p in enumerate(process, first):
        tr = turn(sid, t, [{"role": "user", "content": "q"}], n=3, episode=ep)
        tf = TransitionFormed(tenant="test", session_id=sid, turn_index=t, turn=tr,
                              next_state_kind=NextStateKind.FEEDBACK)
        votes = [JudgeVote(index=0, raw_text="", score=1 if p > 0 else -1 if p < 0 else None)]
        rj = RewardJudged(tenant="test", session_id=sid, turn_index=t, transition_id=tf.event_id,
                          turn_id=tr.event_id, judge="feedback", judge_model="rule", judge_version="1",
                          prompt_sha256="0" * 64, votes=votes, majority=0, vote_mean=p, group_id=group)
        events += [tf, rj]
    events.append(EpisodeEnded(task_id=ep.task_id, group_id=group, rollout_index=k, attempt=attempt,
                               session_id=sid, outcome=outcome, verifier="numeric", verifier_version="1",
                               ended=EpisodeEnd.ANSWERED, steps=len(process), group_size=size,
                               first_turn_index=first))
    return events


def by_step(samples) -> dict:
    return {(s.session_id, s.step_index): s for s in samples}


def test_a_group_becomes_samples_with_step_wise_advantages_in_any_arrival_order():
    rollouts = {0: ([1.0, 1.0], 1.0), 1: ([-1.0, 1.0], -0.6), 2: ([0.0], -1.0)}
    events = [e for k, (p, o) in rollouts.items() for e in rollout("g1", k, p, o)]
    expected = None
    for seed in range(6):
        shuffled = list(events)
        random.Random(seed).shuffle(shuffled)
        run = Run()
        for e in shuffled[:-1]:
            run.feed(e)
            assert not run.samples   # nothing until the last record of the group is in
        run.feed(shuffled[-1])
        got = {k: (s.advantage, s.normaliser, s.step_reward, s.outcome, s.process_reward, s.group_size,
                   s.loss_mask[0]) for k, s in by_step(run.samples).items()}
        expected = expected or got
        assert got == expected
        assert set(run.table) == {"g|g1"} and run.table["g|g1"]["done"]   # tokens forgotten, mark kept
    # step 0: rewards 1+1, -0.6-1, -1+0 across three rollouts
    r = [2.0, -1.6, -1.0]
    mean = sum(r) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
    assert expected[("g1-a0-r0", 0)][0] == pytest.approx((2.0 - mean) / (std + EPS))
    assert expected[("g1-a0-r2", 0)][:3] == (pytest.approx((-1.0 - mean) / (std + EPS)), "bucket", -1.0)
    # step 1: two rollouts have it, rewards 2.0 and 0.4
    assert expected[("g1-a0-r0", 1)][:2] == (pytest.approx(1.0, abs=1e-5), "bucket")
    assert expected[("g1-a0-r1", 1)][:2] == (pytest.approx(-1.0, abs=1e-5), "bucket")
    assert {v[5] for v in expected.values()} == {3}


def test_an_all_fail_group_still_has_non_zero_step_advantages():
    run = Run()
    for k, p in enumerate([[1.0, -1.0], [-1.0, -1.0], [1.0, 1.0]]):
        for e in rollout("fail", k, p, -1.0):
            run.feed(e)
    s = by_step(run.samples)
    assert all(x.outcome == -1.0 for x in run.samples)
    assert s[("fail-a0-r0", 0)].advantage > 0 > s[("fail-a0-r1", 0)].advantage
    assert s[("fail-a0-r2", 1)].advantage > 0 > s[("fail-a0-r1", 1)].advantage


def test_equal_buckets_are_kept_for_the_record_but_not_trained_and_one_bucket_is_always_kept():
    run = Run()
    for k in range(3):
        for e in rollout("same", k, [1.0, 0.0], 1.0):
            run.feed(e)
    s = by_step(run.samples)
    assert len(run.samples) == 6
    assert [s[(f"same-a0-r{k}", 1)].normaliser for k in range(3)] == ["dropped"] * 3
    assert all(s[(f"same-a0-r{k}", 1)].loss_mask == [0, 0, 0] for k in range(3))
    assert [s[(f"same-a0-r{k}", 0)].normaliser for k in range(3)] == ["kept"] * 3   # the batch keeps one


def test_the_outcome_estimator_broadcasts_the_group_normalised_outcome():
    run = Run(estimator="outcome")
    for k, o in enumerate([1.0, -1.0, -1.0]):
        for e in rollout("grpo", k, [1.0, -1.0, 0.0][: k + 1], o):
            if not isinstance(e, RewardJudged):   # the outcome estimator does not wait for judgements
                run.feed(e)
    s = by_step(run.samples)
    assert len(run.samples) == 6
    assert {x.normaliser for x in run.samples} == {"group"}
    assert s[("grpo-a0-r0", 0)].advantage == pytest.approx(math.sqrt(2), rel=1e-4)
    assert s[("grpo-a0-r2", 2)].advantage == pytest.approx(-1 / math.sqrt(2), rel=1e-4)
    assert all(x.event_id != y.event_id for x in run.samples for y in run.samples if x is not y)


def test_the_first_complete_attempt_wins_and_late_records_change_nothing():
    run = Run()
    first = [e for k in (0, 1) for e in rollout("att", k, [1.0], 1.0, attempt=0)]   # attempt 0: 2 of 3
    for e in first:
        run.feed(e)
    retry = [e for k in range(3) for e in rollout("att", k, [-1.0, 1.0], -1.0 + k, attempt=1)]
    for e in retry:
        run.feed(e)
    assert {s.session_id for s in run.samples} == {f"att-a1-r{k}" for k in range(3)}
    before = len(run.samples)
    for e in rollout("att", 2, [1.0], 1.0, attempt=0) + retry[:2]:
        run.feed(e)
    assert len(run.samples) == before and run.table["g|att"]["emitted_attempt"] == 1


def test_the_deadline_emits_what_is_complete_or_drops_a_group_too_small():
    run = Run(deadline_s=60, min_size=2)
    for k in (0, 1):
        for e in rollout("late", k, [1.0, -1.0][k:k + 1], [1.0, -1.0][k]):
            run.feed(e)
    hung = rollout("late", 2, [1.0, 1.0], 1.0)
    for e in hung[:2]:   # its first step, then nothing: the episode hung
        run.feed(e)
    run.now += 30
    run.check()
    assert not run.samples
    run.now += 31
    run.check()
    assert {s.session_id for s in run.samples} == {"late-a0-r0", "late-a0-r1"}
    assert {s.group_size for s in run.samples} == {2}
    assert any(n and n.startswith("group emitted at its deadline") for n in run.notes)

    small = Run(deadline_s=60, min_size=2)
    for e in rollout("tiny", 0, [1.0], 1.0):
        small.feed(e)
    small.now += 61
    small.check()
    assert not small.samples and small.table["g|tiny"]["done"]
    assert any(n and n.startswith("group dropped at its deadline") for n in small.notes)
    small.now += small.s.done_retention_s
    small.check()
    assert small.table == {}   # the finished group's mark is forgotten after its retention


def test_a_judgement_whose_transition_never_comes_is_swept_and_personal_turns_are_not_ours():
    run = Run(deadline_s=60)
    events = rollout("orphan", 0, [1.0], 1.0)
    run.feed(events[1])   # the judgement alone
    assert list(run.table) == [f"j|{events[0].event_id}"]
    run.now += 61
    run.check()
    assert run.table == {}

    personal = TransitionFormed(tenant="test", session_id="p", turn_index=0,
                                turn=turn("p", 0, [{"role": "user", "content": "hi"}]),
                                next_state_kind=NextStateKind.NEXT_TURN)
    step = G.on_transition({}, personal, 0, 0.0, GroupSettings())
    assert step.writes == {} and step.note == "not a step of a rollout"


def test_duplicates_are_recognised():
    run = Run()
    events = rollout("dup", 0, [1.0], 1.0)
    for e in events[:2] + events[:2]:
        run.feed(e)
    assert run.notes[-2:] == ["duplicate transition", "duplicate judgement"]


def test_a_rollout_that_ended_in_error_counts_as_ended_but_is_not_trained_on():
    run = Run()
    for k in (0, 1):
        for e in rollout("err", k, [1.0 - 2 * k], 1.0 - 2 * k):
            run.feed(e)
    broken = rollout("err", 2, [1.0], 0.0)
    broken[-1] = broken[-1].model_copy(update={"ended": EpisodeEnd.ERROR, "detail": "sandbox died"})
    for e in broken:
        run.feed(e)
    assert {s.session_id for s in run.samples} == {"err-a0-r0", "err-a0-r1"}   # no wait for a deadline
    assert {s.group_size for s in run.samples} == {2}

    alone = Run()
    for k in range(3):
        events = rollout("allerr", k, [], 0.0)
        events[-1] = events[-1].model_copy(update={"ended": EpisodeEnd.ERROR})
        for e in events:
            alone.feed(e)
    assert not alone.samples and alone.notes[-1].startswith("group dropped: 0 usable")


def test_steps_are_counted_from_the_rollouts_first_turn_and_personal_judgements_are_ignored():
    """A session whose history held assistant messages starts at a later turn index: its steps
    are still steps 0, 1 ... of the group's buckets."""
    run = Run()
    for k, first in enumerate([0, 2, 5]):
        for e in rollout("late-start", k, [1.0, -1.0 + k], 1.0 - k, first=first):
            run.feed(e)
    assert len(run.samples) == 6 and {s.step_index for s in run.samples} == {0, 1}
    assert [s.normaliser for s in run.samples if s.step_index == 0] == ["bucket"] * 3   # one bucket, across
    judged = rollout("x", 0, [1.0], 1.0)[1].model_copy(update={"group_id": None})
    step = G.on_judgement({}, judged, 0, 0.0, GroupSettings())
    assert step.writes == {} and step.note.startswith("judgement of a turn that is not")


def test_an_outcome_that_is_not_a_number_is_an_error_not_a_full_reward():
    run = Run()
    for k in range(3):
        events = rollout("nan", k, [1.0], [1.0, -1.0, float("nan")][k])
        for e in events:
            run.feed(e)
    assert {s.session_id for s in run.samples} == {"nan-a0-r0", "nan-a0-r1"}
