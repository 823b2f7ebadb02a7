"""One renderer: a turn recorded by the gateway, rendered again from its recorded messages and
tools, gives back its `prompt_token_ids` exactly, and the teacher's prompt for it differs from
the student's by the hint alone, for every message shape the gateway accepts and for chat
templates with and without tool support."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import pytest

from infra.settings import Settings
from processors.teacher import Teacher, TeacherPolicy
from producers.gateway.auth import KeyRing, hash_key
from producers.gateway.server import ServerThread, build_gateway
from schemas.events import TurnRecorded
from serving.chat import HINT_LABEL, MESSAGE_LABEL, render_turn, template_mentions_tools
from tests.producers.gateway_fixtures import engine, tokenizer  # noqa: F401
from tests.producers.openclaw_shapes import openclaw_tools, parts

TOOLS = openclaw_tools()[:3]
CALL = {"id": "call_4", "type": "function",
        "function": {"name": TOOLS[0]["function"]["name"], "arguments": '{"path": "notes.md"}'}}

SHAPES: dict[str, tuple[list[dict[str, Any]], list | None]] = {
    "strings": ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}], None),
    "content parts": ([{"role": "system", "content": [*parts("you are"), *parts("an assistant")]},
                       {"role": "user", "content": [*parts("first part"), *parts("second part")]}], None),
    "developer role": ([{"role": "developer", "content": "answer in French"},
                        {"role": "user", "content": parts("bonjour")}], None),
    "tools and tool calls": ([{"role": "system", "content": "use tools"},
                              {"role": "user", "content": "read my notes"},
                              {"role": "assistant", "content": None, "tool_calls": [CALL]},
                              {"role": "tool", "tool_call_id": "call_4", "content": "buy milk"},
                              {"role": "user", "content": "and now?"}], TOOLS),
    "openclaw": ([{"role": "system", "content": parts("You are a personal assistant running inside OpenClaw.")},
                  {"role": "user", "content": parts("Runtime: sessionId=abc\nwhat is on my list?")},
                  {"role": "assistant", "content": None,
                   "tool_calls": [dict(CALL, id="call4", function=dict(CALL["function"], arguments='{"path":"notes.md"}'))]},
                  {"role": "tool", "tool_call_id": "call4", "content": parts("buy milk")},
                  {"role": "assistant", "content": "You need milk."},
                  {"role": "user", "content": parts("thanks")},
                  {"role": "user", "content": parts("[internal context] time=12:00")}], TOOLS),
    "no user message": ([{"role": "system", "content": "say something"}], None),
}


def _with_tool_template(tokenizer: Any) -> Any:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n"
                         "{% endfor %}<|im_end|>\n{% endif %}" + tokenizer.chat_template)
    return tok


@pytest.mark.parametrize("template", ["without tool support", "with tool support"])
def test_a_recorded_turn_renders_back_to_its_prompt_and_the_teacher_adds_only_the_hint(
        settings: Settings, engine, tokenizer, tmp_path, template):
    tok = tokenizer if template == "without tool support" else _with_tool_template(tokenizer)
    assert template_mentions_tools(tok) == (template == "with tool support")
    s = settings.model_copy(update={"gateway": settings.gateway.model_copy(update={"spool_dir": tmp_path / "spool"})})
    gw = build_gateway(s, engine, tok, drain=False, keys=KeyRing({"t": hash_key("k")}))
    with ServerThread(gw) as server, httpx.Client(base_url=server.url, timeout=60,
                                                  headers={"Authorization": "Bearer k"}) as client:
        for name, (messages, tools) in SHAPES.items():
            body = {"model": "policy", "messages": messages, "max_tokens": 1, "temperature": 0}
            if tools:
                body["tools"] = tools
            r = client.post("/v1/chat/completions", json=body, headers={"X-Session-Id": name})
            assert r.status_code == 200, (name, r.text)
    turns = {s.event.session_id: s.event for s in gw.spool.read(1000) if isinstance(s.event, TurnRecorded)}
    assert set(turns) == set(SHAPES)
    teacher = Teacher(engine, tok, TeacherPolicy.BASE)
    hint = "check the file first"
    for name, turn in turns.items():
        assert render_turn(tok, turn.messages_json, turn.tools_json) == turn.prompt_token_ids, name
        student = tok.decode(turn.prompt_token_ids)
        taught = tok.decode(teacher.prompt_ids(turn, hint))
        if name == "no user message":
            added = f"<|im_start|>user\n{HINT_LABEL}\n{hint}<|im_end|>\n"
            assert taught.count(added) == 1 and taught.replace(added, "") == student
        else:   # the labelled hint goes in front of the last user message's text, nothing else changes
            inserted = f"{HINT_LABEL}\n{hint}\n\n{MESSAGE_LABEL}\n"
            assert taught.count(inserted) == 1 and taught.replace(inserted, "", 1) == student, name
        if SHAPES[name][1]:   # tools reach the prompt on both kinds of template
            assert json.loads(turn.tools_json) == TOOLS and TOOLS[0]["function"]["name"] in student
