"""HTTP clients of our own that survive a server closing an idle keep-alive connection.

A pooled connection that sat idle can be closed by the server at the very moment a client
sends a request on it; the client then sees a reset (`httpx.ReadError`), "Server
disconnected without sending a response" (`RemoteProtocolError`) or a failed write, although
the server never started on the request. Two things keep that race away from our clients:

- the pool forgets idle connections after `KEEPALIVE_EXPIRY_S`, below the keep-alive timeout
  of the servers we talk to (ours default to 75 s; uvicorn's own default is 5 s), so the
  client gives a connection up before the server does;
- `RetryOnFreshConnection` sends a request that failed that way once more, on a connection
  opened for that one retry (the pool may hold more connections the server just closed).

These errors almost always mean the server never started on the request, but a server that
crashed mid-request looks the same, so a retry must be harmless twice: the engine's /generate
records nothing, SGLang's weight loads load the same files again, and the gateway answers a
repeated request id (`X-Request-Id`, which our clients send) with the first answer instead of
recording a second turn. Errors after the response began (a stream cut mid-way) are not
retried. Behind an HTTP(S)_PROXY the client keeps httpx's own proxy transport and only the
short expiry (no retry).

Connections are spread over small pools (`POOL_SHARD` each): httpcore checks every pooled
connection of a pool (a socket poll each) on every request, so one pool of 64 connections made
that check a third of the gateway's time at 64 concurrent requests (py-spy, `nextstate bench
gateway`); a request goes to the shard with the fewest requests in flight.

Knows nothing about any route or payload.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

# Below every server keep-alive we expect (uvicorn 5 s, Node 5 s, nginx 75 s).
KEEPALIVE_EXPIRY_S = 2.0
# Connections per pool shard (see the module docstring).
POOL_SHARD = 8
# What a request that never reached a live server looks like from the client.
NOT_DELIVERED = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class RetryOnFreshConnection(httpx.AsyncBaseTransport):
    """A pooled transport that sends a request again, once, on a new connection when the
    first attempt died before any response arrived."""

    def __init__(self, limits: httpx.Limits | None = None, retries: int = 1) -> None:
        self.limits = limits or httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
        total = self.limits.max_connections or 100
        shards = max(1, -(-total // POOL_SHARD))
        per = httpx.Limits(max_connections=-(-total // shards),
                           max_keepalive_connections=-(-(self.limits.max_keepalive_connections or total) // shards),
                           keepalive_expiry=self.limits.keepalive_expiry)
        # One TLS context for every shard and retry: httpx builds (and loads the CA bundle into)
        # a new one per transport, ~20 ms of the event loop's time each.
        self._ssl = httpx.create_ssl_context()
        self.pools = [httpx.AsyncHTTPTransport(limits=per, verify=self._ssl) for _ in range(shards)]
        self._busy = [0] * shards
        self.retries = retries
        self.retried = 0   # how many requests needed a fresh connection (tests and metrics read it)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        i = min(range(len(self.pools)), key=self._busy.__getitem__)
        self._busy[i] += 1
        try:
            response = await self.pools[i].handle_async_request(request)
        except NOT_DELIVERED as first:
            self._busy[i] -= 1
            error: Exception = first
        except BaseException:
            self._busy[i] -= 1
            raise
        else:
            # the connection stays taken until the body is read and closed (a stream's too)
            response.stream = _Released(response.stream, lambda: self._release(i))
            return response
        for _ in range(self.retries):
            self.retried += 1
            fresh = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=0), verify=self._ssl)
            try:
                # No keep-alive: the connection closes once the response has been read.
                return await fresh.handle_async_request(request)
            except NOT_DELIVERED as again:
                await fresh.aclose()
                error = again
        raise error

    def _release(self, i: int) -> None:
        self._busy[i] -= 1

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()


class _Released(httpx.AsyncByteStream):
    """A response body that calls `release` once when it is closed."""

    def __init__(self, stream: Any, release: Any) -> None:
        self.stream, self.release = stream, release

    async def __aiter__(self):
        async for chunk in self.stream:
            yield chunk

    async def aclose(self) -> None:
        release, self.release = self.release, None
        try:
            await self.stream.aclose()
        finally:
            if release is not None:
                release()


def async_client(base_url: str, *, headers: dict[str, str] | None = None, timeout: Any = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int | None = 100) -> httpx.AsyncClient:
    """An AsyncClient with the expiry and the one retry above; a given `transport` (an ASGI
    app in tests) is used as it is."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    if transport is None and not _proxied():
        transport = RetryOnFreshConnection(limits)
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                             transport=transport, limits=limits)


def _proxied() -> bool:
    # A transport of our own would make httpx ignore the proxy variables.
    return any(os.environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                                           "http_proxy", "https_proxy", "all_proxy"))
