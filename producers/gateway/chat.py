"""Model text in, OpenAI `tool_calls` out (rendering a conversation is serving.chat's).

Tool calls come back in the syntax of the model family's template. A parser per syntax lives
in `TOOL_PARSERS` (name -> parser); `parser_for` picks one from the template text unless the
settings name one.

This module knows no HTTP, engines or Kafka.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from infra.errors import ChatError


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

    def call_syntax(self) -> tuple[str, str, str]:
        """How one call is written: (text before its JSON object, text after it, the key of
        its arguments); what a forced `tool_choice` constrains the answer to."""
        ...


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

    def call_syntax(self) -> tuple[str, str, str]:
        return "<tool_call>\n", "\n</tool_call>", "arguments"

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

    def call_syntax(self) -> tuple[str, str, str]:
        return "", "", "parameters"

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

    def call_syntax(self) -> tuple[str, str, str]:
        return "[TOOL_CALLS][", "]", "arguments"

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
