"""Hindsight revisions in assemble: a rejected answer's approved redo, trained in the rejected
answer's context (processors.assemble: ``revision``, the entries that wait for the other side,
and the timer that drops them)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from infra.settings import load_settings
from processors.assemble import Waiting, as_earlier, as_later, handler, revision, revision_key, scan
from processors.stage import Context
from schemas.events import JudgeVote, Method, NextStateKind, RewardJudged, SampleReady, TransitionFormed
from tests.processors.helpers import turn


def sample(turn_index: int, reward: float, prompt: list[int], response: list[int], session: str = "s",
           **kw) -> SampleReady:
    return SampleReady(tenant="test", session_id=session, turn_index=turn_index, method=Method.COMBINED,
                       prompt_token_ids=prompt, response_token_ids=response, loss_mask=[1] * len(response),
                       behaviour_logprobs=[-0.5] * len(response), reward=reward, policy_version=3, **kw)


A = sample(0, -1.0, [1, 2, 3], [7, 7, 7, 7, 7, 7], teacher_logprobs=[-0.1] * 6, parent_ids=["turn-a", "tr-a"])
B = sample(1, 1.0, [1, 2, 3, 7, 7, 7, 9, 9], [8, 8], parent_ids=["turn-b", "tr-b"])   # A's context resent, then the correction


def test_an_approved_redo_of_a_rejected_answer_is_trained_in_the_rejected_answers_context():
    r = revision(A, B)
    assert r is not None and r.revision_of == A.event_id
    assert r.parent_ids == ["turn-a", A.event_id, "turn-b", B.event_id]
    assert r.prompt_token_ids == A.prompt_token_ids and r.response_token_ids == B.response_token_ids
    assert r.behaviour_logprobs == B.behaviour_logprobs and r.loss_mask == [1, 1]
    assert (r.method, r.reward, r.advantage, r.normaliser) == (Method.RL, 1.0, 1.0, "revision")
    assert (r.session_id, r.turn_index, r.policy_version, r.teacher_logprobs) == ("s", 0, 3, None)
    assert revision(A, B).event_id == r.event_id          # derived: a re-run sends the same id


@pytest.mark.parametrize("why,a,b", [
    ("the redo was rejected too", A, B.model_copy(update={"reward": -1.0})),
    ("the first answer was not rejected", A.model_copy(update={"reward": 0.0}), B),
    ("another session", A, B.model_copy(update={"session_id": "t"})),
    ("history rewritten", A, B.model_copy(update={"prompt_token_ids": [1, 5, 3, 7, 9]})),
    ("the same prompt, nothing after it", A, B.model_copy(update={"prompt_token_ids": [1, 2, 3]})),
    ("a masked sample", A.model_copy(update={"loss_mask": [0] * 6}), B),
    ("a step of a rollout", A.model_copy(update={"task_group": "g"}), B),
    ("a revision is not revised", A, B.model_copy(update={"revision_of": "x"})),
])
def test_what_is_not_a_revision(why, a, b):
    assert revision(a, b) is None, why


def test_the_pair_is_made_whichever_side_is_decided_first_and_the_entry_goes():
    waiting, made = as_earlier(None, A, now=1.0, partition=2)
    assert made == [] and waiting.rejected.event_id == A.event_id and waiting.partition == 2
    assert waiting.rejected.teacher_logprobs is None                  # the teacher rows stay behind
    gone, made = as_later(waiting, B, follows_answer=True, now=2.0)
    assert gone is None and [m.revision_of for m in made] == [A.event_id]
    waiting, first = as_later(None, B, follows_answer=True, now=1.0)   # the redo was decided first
    assert first == [] and waiting.approved.event_id == B.event_id
    gone, again = as_earlier(waiting, A, now=2.0)
    assert gone is None and [m.event_id for m in again] == [made[0].event_id]


def test_sides_that_form_no_revision_leave_a_mark_or_nothing():
    mark, _ = as_earlier(None, A.model_copy(update={"reward": 1.0}), now=1.0)   # approved: a mark
    assert mark == Waiting(at=1.0)
    assert as_later(mark, B, follows_answer=True, now=2.0) == (None, [])     # the redo takes it away
    assert as_earlier(None, None, now=1.0)[0] == Waiting(at=1.0)             # no sample at all: a mark
    assert as_later(None, B, follows_answer=False, now=1.0) == (None, [])    # a first answer waits for nothing
    assert as_later(None, B.model_copy(update={"reward": -1.0}), follows_answer=True, now=1.0) == (None, [])


def turn_id(session: str, index: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{session}/{index}"))


def transition(session: str, index: int, response: list[int]) -> TransitionFormed:
    messages = [{"role": "user", "content": "how do I boil an egg?"}]
    if index:
        messages += [{"role": "assistant", "content": "first you"}, {"role": "user", "content": "shorter please"}]
    t = turn(session, index, messages, response_token_ids=response, response_logprobs=[-0.4] * len(response),
             event_id=turn_id(session, index))
    return TransitionFormed(tenant="test", session_id=session, turn_index=index, turn=t,
                            next_state_kind=NextStateKind.NEXT_TURN,
                            next_messages_json=json.dumps([{"role": "user", "content": "shorter please"}]),
                            next_turn_event_id=turn_id(session, index + 1) if index == 0 else None)


def judged(t: TransitionFormed, r: int) -> RewardJudged:
    return RewardJudged(tenant="test", session_id=t.session_id, turn_index=t.turn_index, transition_id=t.event_id,
                        turn_id=t.turn.event_id, judge="feedback", judge_model="rules", judge_version="v",
                        prompt_sha256="0" * 64, votes=[JudgeVote(index=0, raw_text="x", score=r)], majority=r)


def run(events: list, revisions: bool = True) -> tuple[list[SampleReady], dict]:
    settings = load_settings()
    settings = settings.model_copy(update={"processors": settings.processors.model_copy(
        update={"method": "rl", "revisions": revisions})})
    state: dict = {}
    handle = handler(Context(settings, state))

    async def go() -> list[SampleReady]:
        out = []
        for e in events:
            result = await handle(e, None, 0, -1)
            if result.keep is not None:
                result.keep()
            out += result.outputs
        return out

    return asyncio.run(go()), state


def test_the_assemble_stage_sends_the_revision_beside_the_two_samples_once():
    s = f"s-{uuid.uuid4().hex[:6]}"
    # helpers.turn gives turn i the prompt ids 10..15+i: turn 1's prompt continues turn 0's
    t0, t1 = transition(s, 0, [100, 101, 102, 103]), transition(s, 1, [200, 201])
    events = [t0, t1, judged(t1, 1), judged(t0, -1), judged(t0, -1), judged(t1, 1)]   # repeats change nothing
    out, state = run(events)
    revisions = [o for o in out if o.revision_of is not None]
    assert len(out) == 3 and len(revisions) == 1
    r = revisions[0]
    assert r.prompt_token_ids == t0.turn.prompt_token_ids and r.response_token_ids == [200, 201]
    assert r.revision_of == next(o.event_id for o in out if o.turn_index == 0 and o.revision_of is None)
    assert t0.turn.event_id in r.parent_ids and t1.turn.event_id in r.parent_ids   # audit finds it from either turn
    assert not any(k.startswith("revise:") for k in state)            # the pair was made: nothing waits
    off, state = run(events, revisions=False)
    assert len(off) == 2 and not any(o.revision_of for o in off) and not any(k.startswith("revise:") for k in state)


def test_an_entry_whose_other_side_never_came_is_dropped_by_the_timer_after_the_wait():
    s = f"s-{uuid.uuid4().hex[:6]}"
    t0 = transition(s, 0, [100, 101])
    out, state = run([t0, judged(t0, -1)])
    (k,) = [k for k in state if k.startswith("revise:")]
    assert k == revision_key("test", turn_id(s, 1)) and state[k]["rejected"]["reward"] == -1.0
    settings = load_settings()
    handle = handler(Context(settings, state))
    request = json.dumps({"key": k}).encode()
    kept = asyncio.run(handle(request, None, 0, -1))
    assert kept.keep is None and kept.note == "revision entry not expired"
    state[k]["at"] -= settings.processors.revision_wait_s + 1
    dropped = asyncio.run(handle(request, None, 0, -1))
    dropped.keep()
    assert k not in state and dropped.note == "revision entry expired"


def test_the_timer_asks_for_the_expired_revision_entries_only_on_their_partitions():
    settings = load_settings()
    old = Waiting(at=0.0, partition=2).model_dump(mode="json")
    fresh = Waiting(at=9e12, partition=1).model_dump(mode="json")
    table = {revision_key("t", "x"): old, revision_key("t", "y"): fresh, str(uuid.uuid4()): {"done": True}}
    sent = []

    async def send(key: bytes, value: bytes, partition: int) -> None:
        sent.append((key.decode(), json.loads(value), partition))

    asyncio.run(scan(settings, table, send))
    assert sent == [(revision_key("t", "x"), {"key": revision_key("t", "x")}, 2)]
