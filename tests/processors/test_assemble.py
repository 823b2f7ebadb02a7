"""Assemble's rule table and join, pure: one test per row, plus lengths that do not match."""

import pytest

from processors.assemble import Join, Side, assemble, on_side
from processors.dead_letters import InvalidRecord
from schemas.events import HintJudged, HintSelection, JudgeVote, Method, RewardJudged
from tests.processors.helpers import transition


def judgement(t, r):
    return RewardJudged(tenant="test", session_id=t.session_id, turn_index=0, transition_id=t.event_id,
                        turn_id=t.turn.event_id, judge="feedback", judge_model="rules", judge_version="v",
                        prompt_sha256="0" * 64, votes=[JudgeVote(index=0, raw_text="x", score=r)], majority=r)


def hint(t, accepted=True, teacher=True, n=None):
    n = len(t.turn.response_token_ids) if n is None else n
    return HintJudged(tenant="test", session_id=t.session_id, turn_index=0, transition_id=t.event_id,
                      turn_id=t.turn.event_id, judge_model="rules", judge_version="v", prompt_sha256="0" * 64,
                      votes=[], selection=HintSelection.LONGEST,
                      accepted_hint="use pathlib please" if accepted else None,
                      rejected_reason=None if accepted else "no positive vote",
                      teacher_policy="base" if teacher else None,
                      teacher_logprobs=[-1.25] * n if (accepted and teacher) else None)


T = transition("x")


@pytest.mark.parametrize("method,r,h,kind,reward,mask,teacher", [
    (Method.RL, 1, None, Method.RL, 1.0, 1, False),
    (Method.RL, -1, None, Method.RL, -1.0, 1, False),
    (Method.RL, 0, None, Method.RL, 0.0, 0, False),
    (Method.OPD, None, "yes", Method.OPD, 0.0, 1, True),
    (Method.COMBINED, 1, "yes", Method.COMBINED, 1.0, 1, True),
    (Method.COMBINED, -1, "yes", Method.COMBINED, -1.0, 1, True),
    (Method.COMBINED, 0, "yes", Method.OPD, 0.0, 1, True),
    (Method.COMBINED, -1, "no", Method.RL, -1.0, 1, False),
    (Method.COMBINED, 1, "rejected", Method.RL, 1.0, 1, False),
])
def test_rule_table(method, r, h, kind, reward, mask, teacher):
    j = judgement(T, r) if r is not None else None
    hj = {None: None, "yes": hint(T), "no": hint(T, teacher=False), "rejected": hint(T, accepted=False)}[h]
    s = assemble(T, j, hj, method).sample
    assert (s.method, s.reward, set(s.loss_mask)) == (kind, reward, {mask})
    assert (s.teacher_logprobs is not None) == teacher
    if not teacher:
        assert s.teacher_logprobs is None  # never the rollout logprobs
    assert s.response_token_ids == T.turn.response_token_ids and s.prompt_token_ids == T.turn.prompt_token_ids
    assert s.behaviour_logprobs == T.turn.response_logprobs
    assert T.event_id in s.parent_ids and T.turn.event_id in s.parent_ids


@pytest.mark.parametrize("method,r,h,reason", [
    (Method.OPD, None, "rejected", "hint rejected: no positive vote"),
    (Method.OPD, None, "no", "hint accepted but no teacher logprobs"),
    (Method.COMBINED, 0, "rejected", "reward 0 and hint rejected"),
])
def test_nothing_with_a_reason(method, r, h, reason):
    j = judgement(T, r) if r is not None else None
    hj = {"no": hint(T, teacher=False), "rejected": hint(T, accepted=False)}[h]
    out = assemble(T, j, hj, method)
    assert out.sample is None and out.reason.startswith(reason)


@pytest.mark.parametrize("method", [Method.OPD, Method.COMBINED, Method.RL])
def test_the_teachers_top_k_rows_travel_with_its_logprobs(method):
    n = len(T.turn.response_token_ids)
    rows = hint(T).model_copy(update={"teacher_top_ids": list(range(2 * n)),
                                      "teacher_top_logprobs": [-0.5, -1.5] * n})
    s = assemble(T, judgement(T, 1), rows, method).sample
    if method is Method.RL:
        assert s.teacher_top_ids is None and s.teacher_top_logprobs is None
    else:
        assert s.teacher_top_ids == list(range(2 * n)) and s.teacher_top_k == 2
    bad = rows.model_copy(update={"teacher_top_ids": list(range(2 * n - 1))})
    if method is not Method.RL:
        with pytest.raises(InvalidRecord, match="teacher top-K ids but"):
            assemble(T, judgement(T, 1), bad, method)


def test_mismatched_teacher_lengths_are_invalid_never_padded():
    with pytest.raises(InvalidRecord, match="4 response tokens but 3 teacher_logprobs"):
        assemble(T, judgement(T, 1), hint(T, n=3), Method.COMBINED)


def test_join_waits_for_the_sides_its_method_needs_then_stays_done():
    j, h = judgement(T, 1), hint(T)
    s1 = on_side(None, Side.JUDGEMENT, j, Method.COMBINED)
    assert s1.outputs == [] and s1.state.has() == {Side.JUDGEMENT}
    s2 = on_side(s1.state, Side.TRANSITION, T, Method.COMBINED)
    assert s2.outputs == []
    s3 = on_side(Join.from_table(s2.state.to_table()), Side.HINT, h, Method.COMBINED)
    (sample,) = s3.outputs
    assert sample.method is Method.COMBINED and s3.state.done
    again = on_side(s3.state, Side.HINT, h, Method.COMBINED)
    assert again.outputs == [] and "after the sample was decided" in again.note
    # rl ignores hints entirely and does not create state for them
    assert on_side(None, Side.HINT, h, Method.RL).state is None
    rl = on_side(on_side(None, Side.TRANSITION, T, Method.RL).state, Side.JUDGEMENT, j, Method.RL)
    assert rl.outputs[0].method is Method.RL
    assert rl.outputs[0].event_id != sample.event_id  # ids depend on the method


def with_answer(h, ids=(7, 8, 9)):
    return h.model_copy(update={"teacher_answer_ids": list(ids), "teacher_answer_logprobs": [-0.5] * len(ids)})


@pytest.mark.parametrize("method,r", [(Method.COMBINED, -1), (Method.COMBINED, 1), (Method.COMBINED, 0),
                                      (Method.OPD, None)])
def test_the_teachers_own_answer_is_a_sample_in_the_students_context(method, r):
    j = judgement(T, r) if r is not None else None
    step = on_side(None, Side.TRANSITION, T, method)
    for side, event in ((Side.JUDGEMENT, j), (Side.HINT, with_answer(hint(T)))):
        if event is not None:
            step = on_side(step.state, side, event, method)
    own, answer = step.outputs
    assert answer.prompt_token_ids == own.prompt_token_ids == T.turn.prompt_token_ids
    assert answer.response_token_ids == [7, 8, 9] and answer.behaviour_logprobs == [-0.5] * 3
    assert answer.loss_mask == [1, 1, 1] and answer.teacher_logprobs is None
    # an example of its own: advantage 1 whatever the user said of the student's answer, no reward
    assert (answer.method, answer.advantage, answer.reward, answer.normaliser) == (Method.RL, 1.0, 0.0, "teacher")
    assert answer.revision_of == own.event_id and own.event_id in answer.parent_ids
    again = on_side(None, Side.TRANSITION, T, method)
    for side, event in ((Side.JUDGEMENT, j), (Side.HINT, with_answer(hint(T)))):
        if event is not None:
            again = on_side(again.state, side, event, method)
    assert again.outputs[1].event_id == answer.event_id   # derived: a re-run sends the same sample


def test_no_teacher_answer_sample_where_the_sample_does_not_use_the_hint():
    h = with_answer(hint(T))
    rl = on_side(on_side(None, Side.TRANSITION, T, Method.RL).state, Side.JUDGEMENT, judgement(T, -1), Method.RL)
    assert [s.method for s in rl.outputs] == [Method.RL]   # rl reads no hint
    no_teacher = with_answer(hint(T, teacher=False))
    step = on_side(on_side(None, Side.TRANSITION, T, Method.COMBINED).state, Side.JUDGEMENT, judgement(T, -1),
                   Method.COMBINED)
    step = on_side(step.state, Side.HINT, no_teacher, Method.COMBINED)
    assert len(step.outputs) == 1 and step.outputs[0].teacher_logprobs is None
    plain = on_side(on_side(None, Side.TRANSITION, T, Method.COMBINED).state, Side.JUDGEMENT, judgement(T, -1),
                    Method.COMBINED)
    plain = on_side(plain.state, Side.HINT, hint(T), Method.COMBINED)
    assert len(plain.outputs) == 1 and h.teacher_answer_ids   # the same hint without an answer: one sample
