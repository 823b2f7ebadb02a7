"""Which session a chat request belongs to, and its turn index.

Explicit sessions. `X-Session-Id` (source HEADER), else the body's `session_id`, else the
body's OpenAI `user` field (source BODY) names the session. Turn type comes from
`X-Turn-Type` or the body's `turn_type`; without either a turn is MAIN, so a client that
says nothing still produces training data.

Derived sessions (source DERIVED), for clients that send no id, like stock OpenClaw. Such
clients resend the whole conversation each request, but the previous request's trailing
internal-context user message is not part of the next request's prefix. The rule:

1. A conversation's *anchor* is sha256(tenant, the leading system messages' text, the first
   user message's text). Only sessions with the same anchor are candidates.
2. Each message is reduced to a fingerprint: sha256 of role, whitespace-trimmed text (string
   or text parts alike) and, for assistant messages, the tool calls' names and arguments as
   canonical JSON. Tool-call ids are left out, and a system prompt's numbers too: real clients
   renumber call ids, re-serialise arguments, and put the date in the system prompt.
3. A request N continues candidate S when, with P the fingerprints of S's last request,
   N starts with P (or with P minus its last message, when that message is a user message:
   the dropped internal context) and the message right after that prefix is an assistant
   message (our reply as the client stored it; its text is not required to match, since
   clients reformat it). If S's last request got no answer (it failed), N may also be P plus
   a user message: clients keep the failed turn's message and add the next.
4. Among several candidates the longest matched prefix wins, then the one whose recorded
   reply text matches that assistant message, then the most recently active.
5. Nothing matches: a new session `d-<anchor prefix>-<random>` starts at turn 0.

Turn index. Every recorded turn, main or side, takes the session's next index when it is
recorded (so a failed request leaves no gap); indices order the session's turns and
processors select main turns by `turn_type`. A derived session starts at 0. An explicit
session the tracker does not know (first seen, or seen before a gateway restart) starts at
the number of assistant messages in the request (the turns the conversation already had),
so a restart does not reuse indices.

A session ends on `X-Session-Done`, on `POST /v1/sessions/{id}/end`, or after
`session_idle_timeout_s` without a request; `expire`/`end` hand back the ended session so
the caller emits SESSION_END. The tracker lives in memory: after a gateway restart a
conversation in progress starts a new derived session (its turns are all recorded; the old
session simply gets no SESSION_END, which the sessionizer's own timeout covers). Clients that name their session (the OpenClaw session
headers, or the `Runtime: ... sessionId=` line it writes; producers.gateway.service) keep it
across restarts.

Pure bookkeeping: no HTTP, no Kafka. Not thread-safe; the gateway uses it from its event loop.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.events import SessionSource

_RETIRED_MAX = 10_000


def _h(*parts: str) -> str:
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return (content or "").strip()


_DIGITS = re.compile(r"\d+")


def _stable(message: dict[str, Any]) -> str:
    """A message's text as far as recognising a conversation goes: a system prompt's numbers
    are left out (clients put the date in it, so it changes at midnight)."""
    text = _text(message)
    return _DIGITS.sub("#", text) if message.get("role") in ("system", "developer") else text


def _arguments(raw: Any) -> str:
    """Tool-call arguments as canonical JSON: clients re-serialise them when they resend history."""
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return str(raw)


def fingerprint(message: dict[str, Any]) -> str:
    """Role, text and (for the assistant) the tool calls' names and canonical arguments; tool-call
    ids are left out (clients renumber them: `call_4` comes back as `call4`)."""
    role = message.get("role", "")
    parts = [role, _stable(message)]
    if role == "assistant":
        for call in message.get("tool_calls") or []:
            fn = call.get("function", {})
            parts += [str(fn.get("name")), _arguments(fn.get("arguments"))]
    return _h(*parts)[:32]


def _assistant_turns(messages: list[dict[str, Any]]) -> int:
    """Replies already in a new session's history."""
    return sum(1 for m in messages if m.get("role") == "assistant")


def anchor(tenant: str, messages: list[dict[str, Any]]) -> str:
    system = [_stable(m) for m in messages if m.get("role") in ("system", "developer")]
    first_user = next((_text(m) for m in messages if m.get("role") == "user"), "")
    return _h(tenant, *system, "\x01", first_user)


@dataclass
class Session:
    tenant: str
    session_id: str
    source: SessionSource
    anchor: str | None = None
    next_index: int = 0
    last_prefix: tuple[str, ...] = ()
    last_roles: tuple[str, ...] = ()
    last_reply: str | None = None     # trimmed text of the reply to the last request
    last_active: float = 0.0
    turns: int = 0
    group_id: str | None = None       # a rollout of this group: its records are keyed by it
    turns_at_assign: int = -1         # `turns` when the last request was assigned: unchanged = unanswered

    @property
    def last_index(self) -> int | None:
        return self.next_index - 1 if self.next_index else None


@dataclass(frozen=True)
class SessionRef:
    tenant: str
    session_id: str
    source: SessionSource


@dataclass
class SessionTracker:
    idle_timeout_s: float
    clock: Callable[[], float] = time.monotonic
    _sessions: dict[tuple[str, str], Session] = field(default_factory=dict)
    _by_anchor: dict[tuple[str, str], list[Session]] = field(default_factory=dict)
    _retired: OrderedDict[tuple[str, str], int] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, tenant: str, session_id: str) -> Session | None:
        return self._sessions.get((tenant, session_id))

    def assign(self, tenant: str, messages: list[dict[str, Any]], session_id: str | None = None,
               source: SessionSource = SessionSource.HEADER, continue_final: bool = False) -> SessionRef:
        """The session a request belongs to; remembers the request as the session's last. With
        `continue_final` the last message is a prefill the response continues: part of the
        reply being made, not of the history (the next request holds prefill + reply there)."""
        if continue_final and messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        prints = tuple(fingerprint(m) for m in messages)
        roles = tuple(m.get("role", "") for m in messages)
        if session_id is not None:
            session = self._sessions.get((tenant, session_id)) or self._open(
                tenant, session_id, source, None, _assistant_turns(messages))
        else:
            key = anchor(tenant, messages)
            session = self._match(tenant, key, prints, roles, messages) or self._open(
                tenant, f"d-{key[:12]}-{uuid.uuid4().hex[:8]}", SessionSource.DERIVED, key, 0)
        session.last_prefix, session.last_roles = prints, roles
        session.last_reply = None
        session.turns_at_assign = session.turns
        session.last_active = self.clock()
        return SessionRef(tenant, session.session_id, session.source)

    def group_of(self, tenant: str, session_id: str) -> str | None:
        """The group a session's turns named (X-Group-Id), if this gateway saw one."""
        session = self._sessions.get((tenant, session_id))
        return session.group_id if session is not None else None

    def take_index(self, ref: SessionRef, group_id: str | None = None) -> int:
        """The next turn index of the session (taken when a turn is recorded, so a failed
        request leaves no gap). A session that ended meanwhile keeps counting."""
        session = self._sessions.get((ref.tenant, ref.session_id))
        if session is None:
            session = self._open(ref.tenant, ref.session_id, ref.source, None, 0)
        index = session.next_index
        session.next_index += 1
        session.turns += 1
        if group_id is not None:
            session.group_id = group_id
        session.last_active = self.clock()
        return index

    def record_reply(self, tenant: str, session_id: str, text: str | None) -> None:
        """Remember the reply text to break ties between look-alike conversations."""
        session = self._sessions.get((tenant, session_id))
        if session is not None:
            session.last_reply = (text or "").strip()
            session.last_active = self.clock()

    def _open(self, tenant: str, session_id: str, source: SessionSource, key: str | None,
              start: int) -> Session:
        start = max(start, self._retired.pop((tenant, session_id), 0))
        session = Session(tenant, session_id, source, key, next_index=start, last_active=self.clock())
        self._sessions[(tenant, session_id)] = session
        if key is not None:
            self._by_anchor.setdefault((tenant, key), []).append(session)
        return session

    def _match(self, tenant: str, key: str, prints: tuple[str, ...], roles: tuple[str, ...],
               messages: list[dict[str, Any]]) -> Session | None:
        best, best_rank = None, None
        for s in self._by_anchor.get((tenant, key), ()):
            keeps = [len(s.last_prefix)]
            if s.last_roles and s.last_roles[-1] == "user":
                keeps.append(len(s.last_prefix) - 1)
            for keep in keeps:
                if len(prints) > keep and roles[keep] == "assistant" and prints[:keep] == s.last_prefix[:keep]:
                    same_reply = s.last_reply is not None and s.last_reply == _text(messages[keep])
                    rank = (keep, same_reply, s.last_active)
                    if best_rank is None or rank > best_rank:
                        best, best_rank = s, rank
                    break
            else:
                # The last request got no answer (it failed): the client keeps its user message
                # and adds the next one, so the request extends the last one with a user message.
                keep = len(s.last_prefix)
                if (s.last_reply is None and s.turns_at_assign == s.turns and len(prints) > keep
                        and roles[keep] == "user" and prints[:keep] == s.last_prefix):
                    rank = (keep, False, s.last_active)
                    if best_rank is None or rank > best_rank:
                        best, best_rank = s, rank
        return best

    def end(self, tenant: str, session_id: str) -> Session | None:
        """Forget a session; the ended session, or None if it was not known."""
        session = self._sessions.pop((tenant, session_id), None)
        if session is None:
            return None
        if session.anchor is not None:
            peers = self._by_anchor.get((tenant, session.anchor), [])
            peers[:] = [p for p in peers if p is not session]
            if not peers:
                self._by_anchor.pop((tenant, session.anchor), None)
        # A client that reuses an ended id continues its numbering instead of clashing.
        self._retired[(tenant, session_id)] = session.next_index
        while len(self._retired) > _RETIRED_MAX:
            self._retired.popitem(last=False)
        return session

    def expire(self, now: float | None = None) -> list[Session]:
        """End and return every session idle for longer than the timeout."""
        now = self.clock() if now is None else now
        idle = [s for s in self._sessions.values() if now - s.last_active > self.idle_timeout_s]
        return [s for s in (self.end(s.tenant, s.session_id) for s in idle) if s is not None]
