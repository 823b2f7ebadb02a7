"""Pure parts of the gateway without a server or Kafka: messages and templates, tool-call
parsers, the streaming text assembler, session derivation (OpenClaw-shaped), keys, wire
validation."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from infra.errors import ChatError, ConfigError
from producers.gateway.auth import KeyRing, bearer, dev_key, hash_key
from producers.gateway.chat import TOOL_PARSERS, parser_for
from producers.gateway.decode import TextAssembler
from producers.gateway.sessions import SessionTracker
from producers.gateway.wire import ChatCompletionRequest, FeedbackRequest, describe
from schemas.events import SessionSource
from serving.chat import normalize_messages, render_prompt, text_of
from tests.producers.gateway_fixtures import tokenizer  # noqa: F401  (fixture)
from tests.producers.openclaw_shapes import openclaw_request, openclaw_tools


def test_text_parts_join_and_non_text_parts_are_refused():
    assert text_of([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "a\nb"
    assert text_of(None) == ""
    with pytest.raises(ChatError, match="image_url"):
        text_of([{"type": "image_url", "image_url": {"url": "x"}}])


def test_normalize_maps_developer_and_parses_tool_arguments():
    out = normalize_messages([
        {"role": "developer", "content": "be brief"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "ls", "arguments": '{"path": "/"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "bin etc"}]},
    ])
    assert out[0] == {"role": "system", "content": "be brief"}
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"path": "/"}
    assert out[2] == {"role": "tool", "content": "bin etc", "tool_call_id": "c1"}
    with pytest.raises(ChatError, match="role 'robot'"):
        normalize_messages([{"role": "robot", "content": "x"}])


def test_render_is_the_templates_ids_and_tools_are_never_dropped(tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    ids = render_prompt(tokenizer, msgs, None)
    assert ids == tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    # The tiny template has no `tools`: they are described in a system message instead.
    with_tools = tokenizer.decode(render_prompt(tokenizer, msgs, openclaw_tools()[:2]))
    assert "<tools>" in with_tools and '"name": "read"' in with_tools


def test_hermes_parser_extracts_calls_and_keeps_other_text():
    p = TOOL_PARSERS["hermes"]
    out = p.parse('Let me look.\n<tool_call>{"name": "read", "arguments": {"path": "a.txt"}}</tool_call>')
    assert out.content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("read", {"path": "a.txt"})]
    broken = p.parse("<tool_call>{not json</tool_call>")
    assert broken.tool_calls == [] and "not json" in broken.content


def test_llama3_and_mistral_parsers():
    out = TOOL_PARSERS["llama3_json"].parse('{"name": "exec", "parameters": {"cmd": "ls"}}')
    assert out.content is None and out.tool_calls[0].name == "exec"
    assert TOOL_PARSERS["llama3_json"].parse("plain answer").tool_calls == []
    out = TOOL_PARSERS["mistral"].parse('ok [TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]')
    assert [c.name for c in out.tool_calls] == ["a", "b"] and out.content == "ok"


def test_parser_is_picked_from_the_template(tokenizer):
    assert parser_for(tokenizer).name == "hermes"
    assert parser_for(tokenizer, "mistral").name == "mistral"
    with pytest.raises(ChatError, match="unknown tool parser"):
        parser_for(tokenizer, "nope")


def _feed(tokenizer, assembler, text):
    shown = "".join(assembler.push(t) for t in tokenizer.encode(text, add_special_tokens=False))
    return shown, assembler.finish()


def test_assembler_streams_text_and_cuts_at_a_stop_string(tokenizer):
    a = TextAssembler(tokenizer, stop=["END"])
    shown, final = _feed(tokenizer, a, "héllo wörld END and more")
    assert shown + final.delta == "héllo wörld "
    assert final.stopped_by == "END" and "and more" in final.raw_text


def test_assembler_holds_back_tool_calls_and_partial_markers(tokenizer):
    a = TextAssembler(tokenizer, parser=TOOL_PARSERS["hermes"])
    shown, final = _feed(tokenizer, a, 'Sure.<tool_call>{"name": "ls", "arguments": {}}</tool_call>')
    assert shown == "Sure." and "<tool" not in shown
    assert final.parsed.tool_calls[0].name == "ls"
    b = TextAssembler(tokenizer, parser=TOOL_PARSERS["hermes"])
    shown, final = _feed(tokenizer, b, "a < b <tool")  # never became a call: all of it shows
    assert shown + final.delta == "a < b <tool"


# -- sessions -------------------------------------------------------------------------------

def _conversation(turns: int, system: str, with_context: bool = True):
    """OpenClaw-shaped message lists: history resent, each request's trailing internal-context
    user message dropped from the next request."""
    history = [{"role": "system", "content": [{"type": "text", "text": system}]},
               {"role": "user", "content": [{"type": "text", "text": "fix the build"}]}]
    requests = []
    for t in range(turns):
        ctx = [{"role": "user", "content": [{"type": "text", "text": f"[context {t}] cwd=/w"}]}]
        requests.append(history + (ctx if with_context else []))
        history = history + [{"role": "assistant", "content": f"step {t}"},
                             {"role": "user", "content": [{"type": "text", "text": f"ok {t}"}]}]
    return requests


def test_openclaw_conversation_is_one_derived_session_with_increasing_turns():
    tracker = SessionTracker(idle_timeout_s=600)
    system = "You are OpenClaw. " * 2300  # ~40,000 characters
    ids, turns = set(), []
    for msgs in _conversation(5, system):
        ref = tracker.assign("acme", msgs)
        ids.add(ref.session_id)
        turns.append(tracker.take_index(ref))
        tracker.record_reply("acme", ref.session_id, f"step {len(turns) - 1}")
        assert ref.source is SessionSource.DERIVED
    assert len(ids) == 1 and turns == [0, 1, 2, 3, 4]


def test_same_opening_different_conversations_and_tenants_stay_apart():
    tracker = SessionTracker(idle_timeout_s=600)
    a = _conversation(2, "sys")
    first = tracker.assign("acme", a[0])
    tracker.record_reply("acme", first.session_id, "step 0")
    other_tenant = tracker.assign("globex", a[0])
    second = tracker.assign("acme", a[0])  # a new chat that opens the same way
    tracker.record_reply("acme", second.session_id, "something else")
    assert len({first.session_id, other_tenant.session_id, second.session_id}) == 3
    # The continuation carries the first chat's reply, so it joins the first chat.
    assert tracker.assign("acme", a[1]).session_id == first.session_id


def test_explicit_sessions_idle_expiry_and_restart_numbering():
    now = [0.0]
    tracker = SessionTracker(idle_timeout_s=10, clock=lambda: now[0])
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    ref = tracker.assign("acme", msgs, "s-1", SessionSource.HEADER)
    # Unknown explicit session (e.g. after a restart): numbering starts after its history.
    assert tracker.take_index(ref) == 1
    now[0] = 5.0
    assert tracker.expire() == []
    now[0] = 16.0
    ended = tracker.expire()
    assert [s.session_id for s in ended] == ["s-1"] and len(tracker) == 0
    assert tracker.take_index(tracker.assign("acme", msgs[:1], "s-1")) == 2


# -- auth and wire --------------------------------------------------------------------------

def test_keyring_accepts_hashed_and_raw_keys(tmp_path):
    ring = KeyRing({"acme": hash_key("k1"), "globex": hash_key("k2")})
    assert ring.tenant_for("k1") == "acme" and ring.tenant_for("k2") == "globex"
    assert ring.tenant_for("k3") is None and ring.tenant_for(None) is None
    assert bearer("Bearer k1") == "k1" and bearer("Basic k1") is None and bearer(None) is None
    with pytest.raises(ConfigError, match="not 'sha256"):
        KeyRing({"acme": "sha256:xyz"})
    key = dev_key(tmp_path / "dev-key")
    assert dev_key(tmp_path / "dev-key") == key and (tmp_path / "dev-key").stat().st_mode & 0o777 == 0o600


def test_openclaw_body_validates_and_bad_bodies_say_what_is_wrong():
    req = ChatCompletionRequest.model_validate(openclaw_request([{"role": "user", "content": "hi"}]))
    assert req.stream and req.max_completion_tokens == 64 and len(req.tools) == 12
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({"messages": [], "n": 2, "temperature": 7})
    text = describe(err.value)
    assert "messages" in text and "n=2" in text and "temperature" in text
    with pytest.raises(ValidationError, match="needs the field 'thumbs'"):
        FeedbackRequest.model_validate({"session_id": "s", "kind": "thumbs"})
    assert FeedbackRequest.model_validate({"session_id": "s", "kind": "outcome_reward", "reward": 1}).reward == 1


def test_explicit_session_precedence_header_then_body_then_user():
    from producers.gateway.service import _explicit_session

    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                "session_id": "body-s", "user": "u-1"})
    assert _explicit_session(req, {"x-session-id": "hdr"}) == ("hdr", SessionSource.HEADER)
    assert _explicit_session(req, {}) == ("body-s", SessionSource.BODY)
    only_user = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "user": "u-1"})
    assert _explicit_session(only_user, {}) == ("u-1", SessionSource.BODY)
    bare = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    assert _explicit_session(bare, {}) == (None, SessionSource.DERIVED)


def test_openclaw_session_headers_and_the_runtime_line_name_the_session():
    from producers.gateway.service import _explicit_session

    def req(first_user):
        return ChatCompletionRequest.model_validate({"messages": [
            {"role": "system", "content": "You are OpenClaw."}, {"role": "user", "content": first_user}]})

    plain = req("hello")
    assert _explicit_session(plain, {"session_id": "oc-7"}) == ("oc-7", SessionSource.HEADER)
    assert _explicit_session(plain, {"x-session-affinity": "oc-8"}) == ("oc-8", SessionSource.HEADER)
    runtime = req([{"type": "text", "text": "Runtime: agent=main sessionId=9f2c-11 model=nextstate\nhello"}])
    assert _explicit_session(runtime, {}) == ("9f2c-11", SessionSource.BODY)
    assert _explicit_session(req("tell me about sessionId=x"), {}) == (None, SessionSource.DERIVED)


def test_a_derived_session_survives_what_real_clients_do_to_history():
    """Tool-call ids renumbered and arguments re-serialised, the date in the system prompt
    changing at midnight, a failed turn's user message kept: still one conversation."""
    tracker = SessionTracker(idle_timeout_s=600)
    system = {"role": "system", "content": "You are OpenClaw. Today is 2026-11-29."}
    first = [system, {"role": "user", "content": "list the files"}]
    ref = tracker.assign("acme", first)
    tracker.take_index(ref)
    tracker.record_reply("acme", ref.session_id, "")
    call = {"id": "call_4", "type": "function", "function": {"name": "exec", "arguments": '{"command": "ls",  "cwd": "/w"}'}}
    second = [*first, {"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "call_4", "content": "a.txt"}]
    assert tracker.assign("acme", second).session_id == ref.session_id
    tracker.take_index(ref)
    tracker.record_reply("acme", ref.session_id, "there is a.txt")
    # resent after midnight: new date, the call renumbered, its arguments compact, content null
    resent_call = {"id": "call4", "type": "function", "function": {"name": "exec", "arguments": '{"cwd":"/w","command":"ls"}'}}
    third = [{"role": "system", "content": "You are OpenClaw. Today is 2026-11-30."}, first[1],
             {"role": "assistant", "content": None, "tool_calls": [resent_call]}, second[3],
             {"role": "assistant", "content": "there is a.txt"}, {"role": "user", "content": "open it"}]
    assert tracker.assign("acme", third).session_id == ref.session_id
    # that request failed (no turn recorded); the client keeps its message and adds another
    fourth = [*third, {"role": "user", "content": "are you there?"}]
    assert tracker.assign("acme", fourth).session_id == ref.session_id
    assert tracker.take_index(ref) == 2
