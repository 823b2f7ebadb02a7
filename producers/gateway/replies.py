"""Answer a retried request once: the first answer, by the client's request id.

A client that lost its connection cannot tell whether the gateway got the request. It may
send it again with the same `X-Request-Id` (or `Idempotency-Key`): if the first one was
answered, the gateway answers the retry with that same answer and records nothing; if it is
still running, the retry waits for it; if it failed, the retry runs as a new request. A
request id is the tenant's own: two tenants never share answers.

The same id with a different body is the client's bug, not a retry (422, as the IETF
Idempotency-Key draft says). A streamed answer is not kept, so a streamed request whose id
was seen gets 409 rather than a second recorded turn.

Remembers the last `size` answered ids in memory: a retry after a gateway restart is
served again. Pure bookkeeping on the event loop: no HTTP types, no Kafka.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from infra.errors import GatewayError

HEADERS = ("x-request-id", "idempotency-key")
_VALID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class ReplayConflict(GatewayError):
    """A request id that cannot be answered as a retry; `status` says how (409 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def client_request_id(headers: Mapping[str, str]) -> str | None:
    """The request id the client chose (headers lower-cased), or None; GatewayError if it is
    not 1-128 characters of letters, digits and . _ : -"""
    for name in HEADERS:
        value = headers.get(name, "").strip()
        if value:
            if not _VALID.fullmatch(value):
                raise GatewayError(f"{name} {value[:40]!r} must be 1-128 characters of letters, digits and . _ : -")
            return value
    return None


@dataclass(frozen=True)
class Reply:
    """A finished answer: what the HTTP edge sends back, as it was sent the first time."""

    status: int
    body: Any
    headers: dict[str, str]


_STREAMED = Reply(0, None, {})   # a streamed answer: seen, not kept


class Replies:
    def __init__(self, size: int) -> None:
        self.size = size
        self._done: OrderedDict[tuple[str, str], tuple[str, Reply]] = OrderedDict()
        self._running: dict[tuple[str, str], tuple[str, asyncio.Future]] = {}
        self.replayed = 0

    @staticmethod
    def digest(route: str, body: bytes) -> str:
        return hashlib.sha256(route.encode() + b"\x00" + body).hexdigest()

    async def once(self, tenant: str, request_id: str | None, digest: str,
                   produce: Callable[[], Awaitable[Reply]], *, streamed: bool = False) -> tuple[Reply, bool]:
        """`produce()`'s answer, or the answer already given to this id; the flag says which.
        Without an id (or with size 0) every request is new."""
        if request_id is None or self.size == 0:
            return await produce(), False
        key = (tenant, request_id)
        while True:
            if key in self._done:
                seen, reply = self._done[key]
                self._check(request_id, seen, digest, streamed or reply is _STREAMED)
                self.replayed += 1
                return reply, True
            if key not in self._running:
                break
            seen, running = self._running[key]
            self._check(request_id, seen, digest, streamed)
            try:
                await asyncio.shield(running)
            except Exception:   # the first attempt failed: this one runs as new
                continue
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._running[key] = (digest, future)
        try:
            reply = await produce()
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else GatewayError("cancelled"))
            future.exception()   # retrieved: no "never retrieved" warning when nobody waits
            raise
        else:
            future.set_result(None)
            if 200 <= reply.status < 300:
                self._remember(key, digest, _STREAMED if streamed else reply)
            return reply, False
        finally:
            self._running.pop(key, None)

    def _check(self, request_id: str, seen: str, digest: str, streamed: bool) -> None:
        if seen != digest:
            raise ReplayConflict(422, f"request id {request_id!r} was already used for a different request")
        if streamed:
            raise ReplayConflict(409, f"request id {request_id!r} was already answered as a stream; "
                                      "a stream is not replayed, send a new id")

    def _remember(self, key: tuple[str, str], digest: str, reply: Reply) -> None:
        self._done[key] = (digest, reply)
        self._done.move_to_end(key)
        while len(self._done) > self.size:
            self._done.popitem(last=False)
