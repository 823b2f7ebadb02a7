"""Request bodies shaped like those OpenClaw 2026.9.6 sends to an `openai-completions`
provider: no session headers, always streaming with usage, `max_completion_tokens`, 12 tools
with `tool_choice: auto`, content as arrays of text parts, a ~40,000-character system prompt,
and history resent each request without the previous trailing internal-context message."""

from __future__ import annotations

from typing import Any

_TOOLS = [
    ("read", "Read a file", {"path": "string"}),
    ("write", "Write a file", {"path": "string", "content": "string"}),
    ("edit", "Replace text in a file", {"path": "string", "old": "string", "new": "string"}),
    ("exec", "Run a shell command", {"command": "string"}),
    ("process", "Manage background processes", {"action": "string"}),
    ("web_search", "Search the web", {"query": "string"}),
    ("web_fetch", "Fetch a URL", {"url": "string"}),
    ("browser", "Drive a browser", {"action": "string"}),
    ("message", "Send a message", {"to": "string", "text": "string"}),
    ("memory_search", "Search memory", {"query": "string"}),
    ("memory_get", "Read a memory entry", {"id": "string"}),
    ("sessions_send", "Message another session", {"session": "string", "text": "string"}),
]


def openclaw_tools() -> list[dict[str, Any]]:
    return [{"type": "function", "function": {
        "name": name, "description": desc,
        "parameters": {"type": "object", "properties": {k: {"type": t} for k, t in props.items()},
                       "required": list(props)}}} for name, desc, props in _TOOLS]


def parts(text: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text}]


def system_prompt(chars: int = 40_000) -> str:
    line = "You are a personal assistant running inside OpenClaw. Use tools when they help. "
    return (line * (chars // len(line) + 1))[:chars]


def openclaw_request(messages: list[dict[str, Any]], max_completion_tokens: int = 64) -> dict[str, Any]:
    return {"model": "nextstate", "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}, "max_completion_tokens": max_completion_tokens,
            "tools": openclaw_tools(), "tool_choice": "auto", "store": False}


class OpenClawConversation:
    """Builds each next request the way OpenClaw does from the replies it got."""

    def __init__(self, system: str, first_user: str) -> None:
        self.history: list[dict[str, Any]] = [{"role": "system", "content": parts(system)},
                                              {"role": "user", "content": parts(first_user)}]
        self.turn = 0

    def request(self) -> list[dict[str, Any]]:
        context = {"role": "user", "content": parts(f"[internal context {self.turn}] time=12:0{self.turn}")}
        return [*self.history, context]  # the context message is not kept in the history

    def answered(self, reply: str | None, next_user: str) -> None:
        self.history += [{"role": "assistant", "content": reply or ""},
                         {"role": "user", "content": parts(next_user)}]
        self.turn += 1
