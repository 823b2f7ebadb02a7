"""The SDK records turns and feedback straight to the real Kafka, exactly as given; bad input
is refused with a message naming what was wrong and nothing is sent."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from infra.errors import GatewayError
from producers.sdk import Recorder
from schemas.events import FeedbackKind, FeedbackReceived, SessionSource, TurnRecorded, TurnType
from tests.conftest import wait_for
from tests.producers.helpers import read_events

pytestmark = pytest.mark.stack


def test_sdk_session_reaches_kafka_exactly(settings, registry, namespace):
    with Recorder(settings, tenant="acme", namespace=namespace) as rec:
        s = rec.session("run-17")
        first = s.turn(prompt_token_ids=[1, 2, 3], response_token_ids=[7, 8], response_logprobs=[-0.5, -1.25],
                       response_text="ok", messages=[{"role": "user", "content": "go"}], policy_version=4,
                       sampling={"temperature": 0.6, "max_new_tokens": 32})
        s.turn(prompt_token_ids=[1, 2, 3, 7, 8, 9], response_token_ids=[5], response_logprobs=[-0.1],
               response_text="done", turn_type="side")
        s.feedback("terminal_output", text="make: ok", exit_code=0, parent_ids=[first.event_id])
        s.thumbs(up=True)
        s.end()
        rec.flush()
    events = read_events(settings, registry, namespace, ["TurnRecorded", "FeedbackReceived"], expect=5)
    turns = sorted((e for e in events if isinstance(e, TurnRecorded)), key=lambda e: e.turn_index)
    assert [(t.turn_index, t.turn_type) for t in turns] == [(0, TurnType.MAIN), (1, TurnType.SIDE)]
    assert turns[0].prompt_token_ids == [1, 2, 3] and turns[0].response_token_ids == [7, 8]
    assert turns[0].response_logprobs == [-0.5, -1.25] and turns[0].policy_version == 4
    assert turns[0].sampling.temperature == 0.6 and turns[0].session_source is SessionSource.BODY
    kinds = {e.kind: e for e in events if isinstance(e, FeedbackReceived)}
    assert kinds[FeedbackKind.TERMINAL_OUTPUT].parent_ids == [first.event_id]
    assert kinds[FeedbackKind.THUMBS].thumbs == 1 and kinds[FeedbackKind.SESSION_END].turn_index == 1
    assert all(e.tenant == "acme" and e.source == "sdk" for e in kinds.values())


def test_sdk_spool_mode_delivers_from_a_durable_spool(settings, registry, namespace, tmp_path):
    rec = Recorder(settings, tenant="acme", namespace=namespace, spool_dir=tmp_path / "sdk-spool")
    rec.feedback("s-1", "outcome_reward", reward=-1.0)
    rec.feedback("s-1", "session_end")
    wait_for(lambda: rec.pending == 0, timeout=60, what="the SDK spool to drain")
    rec.close()
    events = read_events(settings, registry, namespace, ["FeedbackReceived"], expect=2)
    assert sorted(e.kind.value for e in events) == ["OUTCOME_REWARD", "SESSION_END"]


def test_sdk_refuses_bad_input_with_what_it_saw(settings, stack, namespace):
    with Recorder(settings, namespace=namespace) as rec:
        with pytest.raises(GatewayError, match="2 response tokens but 1 logprobs"):
            rec.record_turn(session_id="s", turn_index=0, prompt_token_ids=[1], response_token_ids=[1, 2],
                            response_logprobs=[-1.0], response_text="x")
        with pytest.raises(GatewayError, match=r"invalid token ids \[-4\]"):
            rec.record_turn(session_id="s", turn_index=0, prompt_token_ids=[1, -4], response_token_ids=[],
                            response_logprobs=[], response_text="")
        with pytest.raises(ValidationError, match="reward"):
            rec.feedback("s", "outcome_reward", reward=2.0)
        with pytest.raises(ValidationError, match="needs 'text' or 'exit_code'"):
            rec.feedback("s", "terminal_output")
