"""Chat messages in, prompt token ids out; model text in, OpenAI `tool_calls` out.

The prompt is rendered ONCE with the tokenizer's own chat template (tools included) and the
resulting ids are what the engine gets and what a turn records. Message `content` may be a
string or an array of `{"type": "text"}` parts; parts are joined with "\\n" before rendering
because most templates only handle strings. `developer` messages render as `system`.

Tool calls come back in the syntax of the model family's template. A parser per syntax lives
in `TOOL_PARSERS` (name -> parser); `parser_for` picks one from the template text unless the
settings name one. A template that never mentions `tools` gets them described in a system
message in the hermes syntax, so tools are never silently dropped.

This module knows no HTTP, engines or Kafka.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from infra.errors import GatewayError

ROLE_ALIASES = {"developer": "system"}
ROLES = {"system", "user", "assistant", "tool"}


class ChatError(GatewayError):
    """Messages or tools that cannot be rendered into a prompt."""


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
                  tools: list[dict[str, Any]] | None) -> list[int]:
    """Token ids of the prompt: the chat template applied once, with the generation prompt."""
    if tools and not template_mentions_tools(tokenizer):
        messages = _with_tools_described(messages, tools)
        tools = None
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
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


# -- tool-call parsing ----------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, the way OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


class ToolCallParser(Protocol):
    name: str

    def start(self, text: str) -> int | None:
        """Where a tool call begins in `text` (None: no call so far)."""
        ...

    def markers(self) -> tuple[str, ...]:
        """Strings that open a tool call; a stream holds back a trailing partial one."""
        ...

    def parse(self, text: str) -> ParsedOutput: ...


def _call_from_obj(obj: Any, args_key: str = "arguments") -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            json.loads(args)
        except ValueError:
            return None
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5/3, Hermes, SmolLM3)."""

    name = "hermes"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def start(self, text: str) -> int | None:
        i = text.find("<tool_call>")
        return None if i < 0 else i

    def markers(self) -> tuple[str, ...]:
        return ("<tool_call>",)

    def parse(self, text: str) -> ParsedOutput:
        calls, kept, last = [], [], 0
        for m in self._block.finditer(text):
            try:
                call = _call_from_obj(json.loads(m.group(1)))
            except ValueError:
                call = None
            if call is None:  # not a well-formed call: leave the text to the client as content
                continue
            kept.append(text[last:m.start()])
            last = m.end()
            calls.append(call)
        kept.append(text[last:])
        content = "".join(kept).strip()
        return ParsedOutput(content or None, calls)


class Llama3JsonParser:
    """A bare JSON object `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`."""

    name = "llama3_json"

    def start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith("<|python_tag|>") or stripped.startswith("{"):
            return len(text) - len(stripped)
        return None

    def markers(self) -> tuple[str, ...]:
        return ("<|python_tag|>",)

    def parse(self, text: str) -> ParsedOutput:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        calls = []
        for chunk in [c for c in body.split(";") if c.strip()] if body.startswith("{") else []:
            try:
                call = _call_from_obj(json.loads(chunk), "parameters")
            except ValueError:
                return ParsedOutput(text.strip() or None, [])
            if call is None:
                return ParsedOutput(text.strip() or None, [])
            calls.append(call)
        return ParsedOutput(None, calls) if calls else ParsedOutput(text.strip() or None, [])


class MistralParser:
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`."""

    name = "mistral"

    def start(self, text: str) -> int | None:
        i = text.find("[TOOL_CALLS]")
        return None if i < 0 else i

    def markers(self) -> tuple[str, ...]:
        return ("[TOOL_CALLS]",)

    def parse(self, text: str) -> ParsedOutput:
        i = text.find("[TOOL_CALLS]")
        if i < 0:
            return ParsedOutput(text.strip() or None, [])
        try:
            objs = json.loads(text[i + len("[TOOL_CALLS]"):].strip())
        except ValueError:
            return ParsedOutput(text.strip() or None, [])
        calls = [c for c in (_call_from_obj(o) for o in (objs if isinstance(objs, list) else [objs])) if c]
        if not calls:
            return ParsedOutput(text.strip() or None, [])
        return ParsedOutput(text[:i].strip() or None, calls)


TOOL_PARSERS: dict[str, ToolCallParser] = {
    p.name: p for p in (HermesParser(), Llama3JsonParser(), MistralParser())
}

# Template text that identifies a family's tool syntax, checked in order.
_TEMPLATE_SIGNS = (("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3_json"),
                   ("<tool_call>", "hermes"))


def parser_for(tokenizer: Any, name: str | None = None) -> ToolCallParser:
    """The tool-call parser named, or the one the chat template's syntax calls for."""
    if name:
        try:
            return TOOL_PARSERS[name]
        except KeyError:
            raise ChatError(f"unknown tool parser {name!r}; known: {sorted(TOOL_PARSERS)}") from None
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    for sign, parser in _TEMPLATE_SIGNS:
        if sign in template:
            return TOOL_PARSERS[parser]
    # No tool syntax in the template: tools get described in hermes syntax (render_prompt).
    return TOOL_PARSERS["hermes"]
