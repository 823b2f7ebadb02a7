"""Hint votes, selection and the teacher's scores, on the real LocalEngine over the tiny model."""

import asyncio

import pytest

from infra.errors import ChatError
from infra.settings import ProcessorSettings, ServingSettings
from processors.hint import (candidates, judge_hints, overlaps, pick_sequence, pick_tokens, top_k_for, top_rows,
                             with_answer)
from processors.judges import build_hint_judge
from processors.judges.prompts import JudgePrompt
from processors.teacher import Teacher, TeacherPolicy
from schemas.events import HintSelection, HintVote, SamplingParams
from serving.chat import HINT_LABEL, MESSAGE_LABEL, hinted_text, normalize_messages, with_hint
from tests.processors.helpers import transition


def test_candidates_need_a_positive_vote_and_enough_text():
    votes = [HintVote(index=0, raw_text="", score=1, hint="short"),
             HintVote(index=1, raw_text="", score=-1, hint="a long but rejected hint"),
             HintVote(index=2, raw_text="", score=1, hint="  use pathlib for paths  "),
             HintVote(index=3, raw_text="", score=1, hint="always use pathlib for every path")]
    assert [(c.vote_index, c.hint) for c in candidates(votes, 11)] == [
        (3, "always use pathlib for every path"), (2, "use pathlib for paths")]


def test_overlap_math():
    student = [[1, 2, 3], [4, 5, 6]]
    assert overlaps(student, [[1, 2, 9], [7, 8, 9]]) == [2, 0]
    per = [[2, 0], [1, 3], [0, 3]]
    assert pick_sequence(per) == 1            # totals 2, 4, 3
    assert pick_sequence([[1, 1], [2, 0]]) == 0  # tie → earlier (longer) candidate
    assert pick_tokens(per) == [0, 1]
    with pytest.raises(ValueError, match="covers 2 positions"):
        overlaps(student, [[1]])


def test_the_hint_goes_into_the_last_user_message():
    msgs = normalize_messages([{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                               {"role": "user", "content": [{"type": "text", "text": "second"}]},
                               {"role": "tool", "content": "t"}])
    before = with_hint(msgs, "use pathlib")   # the default: the hint first, then the message
    assert before[0] == msgs[0] and before[1:] != msgs[1:]
    assert before[2]["content"] == f"{HINT_LABEL}\nuse pathlib\n\n{MESSAGE_LABEL}\nsecond"
    after = with_hint(msgs, "use pathlib", "after")
    assert after[2]["content"] == f"second\n\n{HINT_LABEL}\nuse pathlib"
    assert msgs[2]["content"] == "second"  # input untouched
    for placement in ("before", "after"):   # no user message: the hint becomes one
        added = with_hint([{"role": "system", "content": "s"}], "h", placement)[-1]
        assert added == {"role": "user", "content": f"{HINT_LABEL}\nh"}
    with pytest.raises(ChatError, match="placement 'middle'"):
        hinted_text("q", "h", "middle")


def test_feedback_hint_path_without_teacher():
    s = ProcessorSettings()
    judge = build_hint_judge(s, "feedback")
    ok = asyncio.run(judge_hints(transition("No, I said use pathlib instead"), judge, 1, 11,
                                 HintSelection.LONGEST, None, 4))
    assert ok.accepted_hint == "No, I said use pathlib instead" and ok.teacher_logprobs is None
    assert ok.candidates[0].vote_index == 0 and ok.rejected_reason is None
    no = asyncio.run(judge_hints(transition("great"), judge, 1, 11, HintSelection.LONGEST, None, 4))
    assert no.accepted_hint is None and no.rejected_reason == "no positive vote"
    short = asyncio.run(judge_hints(transition("no"), judge, 1, 11, HintSelection.LONGEST, None, 4))
    assert short.rejected_reason == "no positive vote with a hint of at least 11 characters"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(), model_dir=tiny_model_dir)
    yield eng
    asyncio.run(eng.close())


def _turn_kw(engine):
    tok = engine.tokenizer
    msgs = [{"role": "user", "content": "write hello world in python"}]
    prompt = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    # Response ids that do not re-tokenize from any text we pass: scoring must use these exactly.
    response = [40, 41, 42, 43, 44, 45, 200, 201]
    return dict(prompt_token_ids=prompt, response_token_ids=response, response_logprobs=[-1.0] * 8)


def test_teacher_scores_the_exact_response_under_the_hinted_prompt(engine):
    t = transition("No, use pathlib", **_turn_kw(engine))
    teacher = Teacher(engine, engine.tokenizer, TeacherPolicy.BASE)
    ids = teacher.prompt_ids(t.turn, "use pathlib")
    text = engine.tokenizer.decode(ids)
    assert "[user's hint / instruction]\nuse pathlib" in text and text.endswith("<|im_start|>assistant\n")
    got = asyncio.run(teacher.score(t.turn, "use pathlib"))
    want = asyncio.run(engine.score(ids, t.turn.response_token_ids, base=True))
    plain = asyncio.run(engine.score(t.turn.prompt_token_ids, t.turn.response_token_ids, base=True))
    assert got.logprobs == want.logprobs and len(got.logprobs) == 8
    assert got.logprobs != plain.logprobs  # the hint changed the context


def test_the_teacher_records_its_top_k_rows_beside_the_sampled_tokens(engine):
    t = transition("No, use pathlib", **_turn_kw(engine))
    teacher = Teacher(engine, engine.tokenizer, TeacherPolicy.BASE)
    judge = build_hint_judge(ProcessorSettings(), "feedback")
    out = asyncio.run(judge_hints(t, judge, 1, 11, HintSelection.LONGEST, teacher, 4, 5))
    want = asyncio.run(teacher.score(t.turn, "No, use pathlib", top_k=5))
    assert out.teacher_logprobs == pytest.approx(want.logprobs)
    assert out.teacher_top_ids == [i for row in want.top_ids for i in row]
    assert out.teacher_top_logprobs == pytest.approx([v for row in want.top_logprobs for v in row])
    # every row most likely first, and the sampled token's logprob never above the row's first
    rows = [out.teacher_top_logprobs[k * 5:(k + 1) * 5] for k in range(8)]
    assert all(r == sorted(r, reverse=True) and lp <= r[0] + 1e-6 for r, lp in zip(rows, out.teacher_logprobs))
    # 8 tokens × K within 20 entries: K shrinks to 2
    small = asyncio.run(judge_hints(t, judge, 1, 11, HintSelection.LONGEST, teacher, 4, 5, 20))
    assert len(small.teacher_top_ids) == 16 and small.teacher_top_ids[:2] == want.top_ids[0][:2]
    off = asyncio.run(judge_hints(t, judge, 1, 11, HintSelection.LONGEST, teacher, 4, 0))
    assert off.teacher_top_ids is None and off.teacher_top_logprobs is None and off.teacher_logprobs


def test_top_k_rows_are_cut_to_one_width_and_bounded_per_record():
    assert top_k_for(100, 16, 65_536) == 16 and top_k_for(10_000, 16, 65_536) == 6
    assert top_k_for(1_000_000, 16, 65_536) == 1 and top_k_for(5, 0, 100) == 0
    assert top_rows([[1, 2, 3], [4, 5]], [[-1.0, -2.0, -3.0], [-1.0, -2.0]], 3) == ([1, 2, 4, 5],
                                                                                     [-1.0, -2.0, -1.0, -2.0])
    assert top_rows(None, None, 3) == (None, None) and top_rows([[1]], [[-1.0]], 0) == (None, None)


class ScriptedHintJudge:
    """A hint judge that always proposes the same candidates (selection is what is tested)."""

    name, model, version = "scripted", "none", "1"

    def __init__(self, hints):
        self.hints = hints

    def prompt(self, transition):
        return JudgePrompt([], "0" * 64)

    async def vote(self, transition, prompt, index):
        return HintVote(index=index, raw_text="", score=1, hint=self.hints[index])


@pytest.mark.parametrize("selection", [HintSelection.OVERLAP_SEQUENCE, HintSelection.OVERLAP_TOKEN])
def test_overlap_guided_selection(engine, selection):
    hints = ["use pathlib for every path you build", "write the answer in French please",
             "print exactly hello world and nothing else"]
    t = transition("no", **_turn_kw(engine))
    teacher = Teacher(engine, engine.tokenizer, TeacherPolicy.CURRENT)
    # the teacher's top-6 rows are recorded; the overlap still compares top-4 sets
    out = asyncio.run(judge_hints(t, ScriptedHintJudge(hints), 3, 11, selection, teacher, 4, 6))
    student = asyncio.run(engine.score(t.turn.prompt_token_ids, t.turn.response_token_ids, top_k=4))
    per = {}
    for h in hints:
        sc = asyncio.run(teacher.score(t.turn, h, top_k=6))
        per[h] = (overlaps(student.top_ids, [r[:4] for r in sc.top_ids]), sc.logprobs, sc.top_ids)
    n = len(t.turn.response_token_ids)
    assert {c.hint: c.overlap_score for c in out.candidates} == pytest.approx(
        {h: sum(o) / (n * 4) for h, (o, _, _) in per.items()})
    order = [c.hint for c in out.candidates]  # longest first, as selection sees them
    if selection is HintSelection.OVERLAP_SEQUENCE:
        best = order[pick_sequence([per[h][0] for h in order])]
        assert out.accepted_hint == best and out.teacher_logprobs == pytest.approx(per[best][1])
        picks = [order.index(best)] * n
    else:
        picks = pick_tokens([per[h][0] for h in order])
        assert out.teacher_logprobs == pytest.approx([per[order[k]][1][i] for i, k in enumerate(picks)])
    assert out.teacher_top_ids == [i for pos, k in enumerate(picks) for i in per[order[k]][2][pos]]
    assert len(out.teacher_top_logprobs) == 6 * n
    assert out.selection is selection and out.teacher_policy == "current"
    assert len(out.teacher_logprobs) == n


def test_the_teacher_defaults_to_the_served_model(tiny_model_dir):
    from infra.settings import Settings
    from processors.teacher import build_teacher

    assert ProcessorSettings.model_fields["teacher_model"].default == "served"
    served = Settings(serving=ServingSettings(model=str(tiny_model_dir)),
                      processors=ProcessorSettings(teacher_model="served"))
    teacher = build_teacher(served)
    try:
        assert teacher is not None and teacher.policy is TeacherPolicy.BASE
        assert teacher.engine.info().max_context == 2048    # the tiny model, not the embedded 8,192
        scores = asyncio.run(teacher.score(transition(0).turn, "be brief"))
        assert len(scores.logprobs) == len(transition(0).turn.response_token_ids)
        before = teacher.tokenizer.decode(teacher.prompt_ids(transition(0).turn, "be brief"))
    finally:
        asyncio.run(teacher.engine.close())
    appended = build_teacher(served.model_copy(update={"processors": ProcessorSettings(hint_placement="AFTER")}))
    try:
        after = appended.tokenizer.decode(appended.prompt_ids(transition(0).turn, "be brief"))
    finally:
        asyncio.run(appended.engine.close())
    # the default puts the hint in front of the message; "after" appends it
    assert before.index("be brief") < before.index(MESSAGE_LABEL) and MESSAGE_LABEL not in after
    assert after.index("be brief") > after.index(HINT_LABEL) > before.index(HINT_LABEL)
    for off in ("none", "NONE", ""):
        assert build_teacher(Settings(processors=ProcessorSettings(teacher_model=off))) is None


def test_the_teacher_writes_its_own_greedy_answer_under_the_hint_when_asked(engine):
    t = transition("No, use pathlib", **_turn_kw(engine))
    t = t.model_copy(update={"turn": t.turn.model_copy(update={"sampling": t.turn.sampling.model_copy(
        update={"max_new_tokens": 12, "temperature": 1.0, "seed": 7})})})
    teacher = Teacher(engine, engine.tokenizer, TeacherPolicy.BASE)
    judge = build_hint_judge(ProcessorSettings(), "feedback")
    out = asyncio.run(with_answer(asyncio.run(judge_hints(t, judge, 1, 11, HintSelection.LONGEST, teacher, 4)),
                                  t, teacher))
    # greedy under the hinted prompt, within the turn's own token limit, whatever its temperature
    greedy = asyncio.run(engine.generate(teacher.prompt_ids(t.turn, "No, use pathlib"),
                                         SamplingParams(temperature=0.0, max_new_tokens=12)))
    assert out.teacher_answer_ids == greedy.token_ids and 0 < len(out.teacher_answer_ids) <= 12
    assert out.teacher_answer_logprobs == pytest.approx(greedy.logprobs)
    assert out.teacher_logprobs is not None   # the score of the student's answer is still there
    # not asked, or no hint accepted: no answer
    plain = asyncio.run(judge_hints(t, judge, 1, 11, HintSelection.LONGEST, teacher, 4))
    assert plain.teacher_answer_ids is None and plain.teacher_answer_logprobs is None
    great = transition("great", **_turn_kw(engine))
    none = asyncio.run(with_answer(asyncio.run(judge_hints(great, judge, 1, 11, HintSelection.LONGEST, teacher, 4)),
                                   great, teacher))
    assert none.accepted_hint is None and none.teacher_answer_ids is None


def test_a_teacher_answer_that_loops_is_left_out():
    from serving.engine import Generation

    class Looping:
        async def generate(self, prompt_ids, params):
            return Generation([1, 2, 3], [-0.1] * 3, "length", 0, len(prompt_ids))

    class Words:
        def decode(self, ids, skip_special_tokens=False):
            return "Boil the egg. Boil the egg. Boil the egg."

    t = transition("No, use pathlib")
    teacher = Teacher(Looping(), Words(), TeacherPolicy.BASE)
    teacher.prompt_ids = lambda turn, hint: [5, 6]
    assert asyncio.run(teacher.answer(t.turn, "use pathlib")) is None
