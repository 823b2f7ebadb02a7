"""OpenClaw's provider config for the served model, and a check that the pairing works.

`openclaw_config` builds the part of `~/.openclaw/openclaw.json` that points OpenClaw at the
gateway: an `openai-completions` provider with the key, the model's `contextWindow` from what
the gateway serves, and the session headers on (`compat.sendSessionIdHeader`,
`compat.sendSessionAffinityHeaders`: the gateway then names each conversation's session from
them, producers.gateway.service). OpenClaw's stock request is about 52,000 characters (a
~40,000-character system prompt and 12 tool schemas), past an 8,192-token context; for a context
under ``SMALL_PROFILE_BELOW`` tokens the config also carries the small profile measured to fit
(about 11,300 characters a request), and `dropped` says what the user gives up with it.

`check_pairing` sends one request as OpenClaw would (a system prompt, a user message, streamed)
and reports the served model, its context and the session the turn went to. Knows nothing about
Kafka; HTTP only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SMALL_PROFILE_BELOW = 16_384   # tokens: OpenClaw's stock prompt alone is ~13,000-15,000

SMALL_PROFILE: dict[str, Any] = {
    "agents": {"defaults": {"contextInjection": "never", "skipBootstrap": True, "skills": []}},
    "tools": {"allow": ["read", "write", "edit", "exec"], "toolSearch": False},
}

DROPPED = ("the workspace files injected into the prompt (AGENTS.md, SOUL.md, USER.md, ...)",
           "the skills list",
           "every tool but read, write, edit and exec (web, memory, browser, sessions, ...)")


@dataclass(frozen=True)
class Served:
    model: str
    context: int
    policy_version: int


def openclaw_config(base_url: str, key: str, served: Served, provider: str = "nextstate",
                    model_id: str = "policy", max_tokens: int = 1024) -> tuple[dict[str, Any], list[str]]:
    """(the config to merge into openclaw.json, what the small profile drops: empty if none)."""
    model = {"id": model_id, "name": f"nextstate {served.model}", "contextWindow": served.context,
             "maxTokens": min(max_tokens, max(1, served.context // 4)),
             "compat": {"sendSessionIdHeader": True, "sendSessionAffinityHeaders": True}}
    config: dict[str, Any] = {
        "models": {"providers": {provider: {
            "baseUrl": base_url.rstrip("/") + "/v1", "apiKey": key, "api": "openai-completions",
            "models": [model]}}},
        "agents": {"defaults": {"model": {"primary": f"{provider}/{model_id}"}}},
    }
    if served.context >= SMALL_PROFILE_BELOW:
        return config, []
    config["agents"]["defaults"].update(SMALL_PROFILE["agents"]["defaults"])
    config["tools"] = dict(SMALL_PROFILE["tools"])
    return config, list(DROPPED)


async def served(client: Any) -> Served:
    """What the gateway serves (GET /v1/models with the client's key)."""
    r = await client.get("/v1/models")
    if r.status_code != 200:
        raise PairingError(f"GET /v1/models answered {r.status_code}: {r.text[:200]}")
    [m] = r.json()["data"][:1] or [None]
    if m is None:
        raise PairingError("GET /v1/models lists no model")
    return Served(m["id"], int(m.get("max_model_len") or 0), int(m.get("policy_version") or 0))


class PairingError(Exception):
    """The gateway cannot be reached, refuses the key, or does not answer a chat request."""


async def check_pairing(client: Any, model_id: str = "policy") -> dict[str, Any]:
    """One streamed chat request shaped like OpenClaw's; what came back."""
    body = {"model": model_id, "stream": True, "stream_options": {"include_usage": True},
            "max_completion_tokens": 8,
            "messages": [{"role": "system", "content": [{"type": "text", "text": "You are a personal assistant."}]},
                         {"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]}
    text, usage = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"X-Turn-Type": "side"}) as r:
        if r.status_code != 200:
            raise PairingError(f"a chat request answered {r.status_code}: {(await r.aread())[:300]!r}")
        session = r.headers.get("x-session-id")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            import json

            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    return {"session": session, "reply": "".join(text), "usage": usage}
