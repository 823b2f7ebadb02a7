"""What a request constrains its answer to, as a grammar the engine enforces (serving.grammar).

- `response_format: {"type": "json_object"}`: one JSON object.
- `response_format: {"type": "json_schema", "json_schema": {"schema": ..., "strict": ...}}`:
  JSON that the schema accepts. An object gets no properties beyond those its schema names
  unless the schema allows them (`additionalProperties`), as in OpenAI's strict mode: left to
  JSON Schema's default (anything goes), a small model fills them with noise. `strict: false`
  asks for that default.
- `tool_choice: "required"` or `{"type": "function", "function": {"name": ...}}`: exactly one
  call, of any offered tool or of the named one, written in the model family's tool syntax
  (the parser's `call_syntax`) with arguments the tool's `parameters` schema accepts (strict
  as above unless the function says `strict: false`).
  A forced call wins over `response_format`, as it does at OpenAI.

JSON comes out compact (`", "` and `": "` between items, no other whitespace): a small model
given any whitespace may spend its tokens on it. The grammar is EBNF text in xgrammar's dialect,
so it travels in `SamplingParams.grammar` to any engine and is recorded with the turn.
A schema the converter cannot read is the client's error (ChatError, a 400 that names it).
"""

from __future__ import annotations

import json
import re
from typing import Any

from infra.errors import ChatError
from producers.gateway.chat import ToolCallParser


def request_grammar(response_format: Any, tool_choice: Any, tools: list[dict[str, Any]] | None,
                    parser: ToolCallParser) -> str | None:
    """The grammar the answer must match, or None when sampling is free."""
    forced = forced_tools(tool_choice, tools)
    if forced:
        return _text(tool_call_grammar(forced, parser))
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return _text(_json_grammar({"type": "object"}, strict=False, what="response_format"))
    spec = response_format.json_schema
    return _text(_json_grammar(spec.schema_ if spec.schema_ is not None else {}, strict=spec.strict is not False,
                               what=f"response_format.json_schema {spec.name or ''}".strip()))


def forced_tools(tool_choice: Any, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The tools one of which must be called: all for "required", the named one for a
    function choice, none for "auto"/"none"/absent (and shapes this gateway does not force)."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return []
    offered = tools or []
    if tool_choice == "required":
        if not offered:
            raise ChatError("tool_choice 'required' needs tools")
        return offered
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        # {"function": {"name": ...}} as chat completions write it, {"name": ...} as Responses do
        function = tool_choice.get("function")
        name = (function.get("name") if isinstance(function, dict) else None) or tool_choice.get("name")
        if not isinstance(name, str):
            raise ChatError("tool_choice of type function needs {'function': {'name': ...}}")
        chosen = [t for t in offered if t["function"]["name"] == name]
        if not chosen:
            raise ChatError(f"tool_choice names the function {name!r}, which is not among the tools "
                            f"({', '.join(repr(t['function']['name']) for t in offered) or 'none given'})")
        return chosen[:1]
    if isinstance(tool_choice, str):
        raise ChatError(f"tool_choice {tool_choice!r} is not one of 'auto', 'none', 'required' "
                        "or a {'type': 'function', 'function': {'name': ...}} object")
    return []


def tool_call_grammar(tools: list[dict[str, Any]], parser: ToolCallParser) -> Any:
    import xgrammar as xgr

    before, after, args_key = parser.call_syntax()
    calls = []
    for tool in tools:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        schema = {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: params},
                  "required": ["name", args_key], "additionalProperties": False}
        calls.append(_json_grammar(schema, strict=fn.get("strict") is not False,
                                   what=f"the parameters of tool {fn['name']!r}"))
    call = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    parts = [p for p in (_literal(before), call, _literal(after)) if p is not None]
    return parts[0] if len(parts) == 1 else xgr.Grammar.concat(*parts)


def _json_grammar(schema: Any, strict: bool, what: str) -> Any:
    import xgrammar as xgr

    if not isinstance(schema, dict):
        raise ChatError(f"{what}: a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)
    except Exception as exc:   # the converter's messages name the construct it could not read
        raise ChatError(f"{what}: the JSON schema cannot be enforced: {converter_message(exc)}") from None


def converter_message(exc: Exception) -> str:
    """xgrammar's message without its time and source-line prefix."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip())[:300]


def _literal(text: str) -> Any:
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}") if text else None


def _text(grammar: Any) -> str:
    return str(grammar)
