"""How a conversation becomes prompt token ids: the one renderer of nextstate.

The gateway renders a request's messages and tools with `render_prompt` and records exactly
those ids; the teacher renders a recorded turn with `render_turn`, adding the hint, and so
reproduces the student's prompt but for the hint. Anything later that turns a conversation
into tokens calls this module, and a test holds the agreement (rendering a recorded turn
gives back its `prompt_token_ids`).

Rendering: the tokenizer's own chat template, applied once, tools included. Message `content`
may be a string or an array of `{"type": "text"}` parts; parts are joined with "\\n" before
rendering because most templates only handle strings. `developer` messages render as
`system`. A template that never mentions `tools` gets them described in a system message in
the hermes syntax, so tools are never silently dropped.

Knows no HTTP, engines or Kafka.
"""

from __future__ import annotations

import json
from typing import Any

from infra.errors import ChatError

# How the teacher reads a hint (processors.hint_placement). "before": the labelled hint, then the
# labelled message. Of the forms tried on SmolLM2-135M (appended, prefixed with and without
# labels, a system message) it did best across preferences; `nextstate bench hints` measures
# "before" against "after" (appended).
HINT_LABEL = "[user's hint / instruction]"
MESSAGE_LABEL = "[question]"
PLACEMENTS = ("before", "after")

ROLE_ALIASES = {"developer": "system"}
ROLES = {"system", "user", "assistant", "tool"}


def text_of(content: Any) -> str:
    """The text of a message `content`: a string, or the text parts of an array joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ChatError(f"content part {i} has type {kind!r}; only "
                                "{'type': 'text', 'text': ...} parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ChatError(f"content must be a string or an array of text parts, not {type(content).__name__}")


def _template_arguments(arguments: Any) -> Any:
    # Templates (Qwen, Llama) expect a mapping and serialise it themselves; OpenAI sends a
    # JSON string. A string that is not JSON is passed through as the client sent it.
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages -> the plain dicts chat templates expect."""
    out = []
    for i, m in enumerate(messages):
        role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
        if role not in ROLES:
            raise ChatError(f"message {i} has role {m.get('role')!r}; expected one of "
                            f"{sorted(ROLES | set(ROLE_ALIASES))}")
        msg: dict[str, Any] = {"role": role, "content": text_of(m.get("content"))}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = [
                {"id": c.get("id"), "type": "function",
                 "function": {"name": c["function"]["name"],
                              "arguments": _template_arguments(c["function"].get("arguments"))}}
                for c in m["tool_calls"]
            ]
        if role == "tool" and m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        if m.get("name"):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None, continue_final: bool = False) -> list[int]:
    """Token ids of the prompt: the chat template applied once, with the generation prompt; or,
    with `continue_final`, ending inside the last (assistant) message, which the response then
    continues (a prefill: prompt, never trained on)."""
    if continue_final and (not messages or messages[-1].get("role") != "assistant"
                           or not isinstance(messages[-1].get("content"), str)):
        raise ChatError("continue_final_message needs a last message from the assistant with text content")
    if tools and not template_mentions_tools(tokenizer):
        messages = _with_tools_described(messages, tools)
        tools = None
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=not continue_final,
                                            continue_final_message=continue_final, tokenize=True, return_dict=False)
    except Exception as exc:  # jinja2 errors raised by the template itself (role order, ...)
        raise ChatError(f"the model's chat template refused these messages: {exc}") from exc
    if ids and isinstance(ids[0], list):  # some tokenizers return a batch of one
        ids = ids[0]
    return [int(t) for t in ids]


def template_mentions_tools(tokenizer: Any) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = " ".join(template.values())
    return bool(template) and "tools" in template


def _with_tools_described(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    block = ("You can call these functions. To call one, answer with "
             '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>.\n'
             f"<tools>\n{listing}\n</tools>")
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{block}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def hinted_text(text: str, hint: str, placement: str = "before") -> str:
    """A user message's text with the hint added: "before" puts the labelled hint first and
    labels the message after it, "after" appends the labelled hint (OpenClaw-RL's form)."""
    if placement not in PLACEMENTS:
        raise ChatError(f"hint placement {placement!r}; expected one of {PLACEMENTS}")
    block = f"{HINT_LABEL}\n{hint}"
    if not text:
        return block
    return f"{text}\n\n{block}" if placement == "after" else f"{block}\n\n{MESSAGE_LABEL}\n{text}"


def with_hint(messages: list[dict[str, Any]], hint: str, placement: str = "before") -> list[dict[str, Any]]:
    """Normalised `messages` with the hint added to the last user message's text (a user
    message is added if there is none): the teacher's context is the student's plus the hint."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = hinted_text(m["content"], hint, placement)
            return out
    return [*out, {"role": "user", "content": hinted_text("", hint, placement)}]


def render_turn(tokenizer: Any, messages_json: str, tools_json: str | None, hint: str | None = None,
                continue_final: bool = False, placement: str = "before") -> list[int]:
    """The prompt ids of a recorded turn (its messages and tools as the gateway recorded them,
    ending inside its prefill when it continued one), with the hint added when one is given."""
    messages = normalize_messages(json.loads(messages_json))
    tools = json.loads(tools_json) if tools_json else None
    return render_prompt(tokenizer, with_hint(messages, hint, placement) if hint is not None else messages,
                         tools, continue_final)
