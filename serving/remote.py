"""The remote engine: an Engine that forwards to `nextstate serve` over HTTP
(`serving.server`), so a process that does not host the engine (the gateway, the teacher)
uses it exactly like a local one: same results, same errors (a context overflow comes back
as ContextLengthError), same policy versions. Weight swaps happen in the serving process;
`load_weights` here is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from infra.errors import ContextLengthError, ServingError
from infra.http import KEEPALIVE_EXPIRY_S
from infra.settings import ServingSettings
from schemas.events import SamplingParams
from serving.engine import EngineInfo, Generation, Scores, TokenDelta, WeightsKind, register_engine

# What a request that never reached a live server looks like from aiohttp (see infra.http):
# /generate and /score record nothing, so such a request is sent once more on a new connection.
NOT_DELIVERED = (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectorError, aiohttp.ClientOSError)


def raise_for(status: int, payload: Any, url: str) -> None:
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        raise ServingError(f"engine at {url} answered {status}: {str(payload)[:300]}")
    if err.get("type") == "ContextLengthError":
        raise ContextLengthError(err["prompt_tokens"], err["max_new_tokens"], err["max_context"])
    raise ServingError(f"engine at {url}: {err.get('type')}: {err.get('message')}")


def _loads(raw: bytes, status: int, url: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ServingError(f"engine at {url} answered {status} with no JSON: {raw[:300]!r}") from None


@register_engine("remote")
class RemoteEngine:
    """The engine hop uses aiohttp, not httpx: at 64 concurrent requests httpx spent about five
    times aiohttp's CPU per request (~0.9 ms against ~0.16 ms in a throwaway loopback test), all of
    it on the gateway's one event loop, where it delays every other request's own work."""

    name = "remote"

    def __init__(self, settings: ServingSettings, model_dir: str | Path | None = None) -> None:
        if not settings.engine_url:
            raise ServingError("engine=remote needs NEXTSTATE_SERVING__ENGINE_URL "
                               "(the address of `nextstate serve`)")
        self.url = settings.engine_url.rstrip("/")
        self.settings = settings
        # per event loop (an aiohttp session belongs to the loop it was made on):
        # (pooled session, session whose connections close after each response, for retries)
        self._sessions: dict[int, tuple[aiohttp.ClientSession, aiohttp.ClientSession]] = {}
        self._info: EngineInfo | None = None
        self.retried = 0
        # The proxy the environment names for this address, looked up once: aiohttp's
        # trust_env would look it up (and read ~/.netrc) on a worker thread for every request.
        try:
            proxy, auth = get_env_proxy_for_url(URL(self.url))
            self._proxy: dict[str, Any] = {"proxy": proxy, "proxy_auth": auth}
        except LookupError:
            self._proxy = {}
        self._sync_info()

    def _headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}

    def _sync_info(self) -> None:
        """Read /info once at construction (blocking), so info() works before any request."""
        try:
            resp = httpx.get(self.url + "/info", headers=self._headers(), timeout=30)
        except httpx.HTTPError as exc:
            raise ServingError(f"engine at {self.url} unreachable: {exc!r}") from exc
        self._info = self._parse_info(resp.status_code, resp.content)

    def _parse_info(self, status: int, raw: bytes) -> EngineInfo:
        data = _loads(raw, status, self.url)
        if status >= 400:
            raise_for(status, data, self.url)
        return EngineInfo(**data)

    async def start(self) -> None:
        async with self._session()[0].get(self.url + "/info", **self._proxy) as resp:
            self._info = self._parse_info(resp.status, await resp.read())

    def _session(self) -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
        loop = id(asyncio.get_running_loop())
        sessions = self._sessions.get(loop)
        if sessions is None:
            # A read timeout per read, as httpx's was (a stream may run long); idle connections
            # are given up before the server's keep-alive ends (infra.http).
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0,
                                            sock_read=self.settings.request_timeout_s)

            def session(**connector: Any) -> aiohttp.ClientSession:
                return aiohttp.ClientSession(headers=self._headers(), timeout=timeout,
                                             connector=aiohttp.TCPConnector(limit=100, **connector))

            sessions = (session(keepalive_timeout=KEEPALIVE_EXPIRY_S), session(force_close=True))
            self._sessions[loop] = sessions
        return sessions

    async def _send(self, path: str, body: bytes) -> aiohttp.ClientResponse:
        """POST, once more on a fresh connection if the first try died before any answer."""
        pooled, fresh = self._session()
        kwargs = {"data": body, "headers": {"content-type": "application/json"}, **self._proxy}
        try:
            return await pooled.post(self.url + path, **kwargs)
        except NOT_DELIVERED:
            self.retried += 1
            return await fresh.post(self.url + path, **kwargs)

    def info(self) -> EngineInfo:
        if self._info is None:
            raise ServingError(f"engine at {self.url}: info not read yet (call start())")
        return self._info

    def _seen(self, version: int) -> None:
        """Keep info().policy_version current from what responses report."""
        if self._info is not None and version > self._info.policy_version:
            self._info = EngineInfo(self._info.name, self._info.model, version, self._info.max_context,
                                    self._info.details)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            async with await self._send(path, orjson.dumps(body)) as resp:
                raw = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ServingError(f"engine at {self.url}{path} failed: {exc!r}") from exc
        data = _loads(raw, resp.status, self.url)
        if resp.status >= 400:
            raise_for(resp.status, data, self.url)
        return data

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        data = await self._post("/generate", {"prompt_ids": prompt_ids, "params": params.model_dump(),
                                              "stream": False})
        self._seen(data["policy_version"])
        return Generation(**data)

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        body = orjson.dumps({"prompt_ids": prompt_ids, "params": params.model_dump(), "stream": True})
        try:
            async with await self._send("/generate", body) as resp:
                if resp.status >= 400:
                    raise_for(resp.status, _loads(await resp.read(), resp.status, self.url), self.url)
                async for line in resp.content:
                    line = line.strip()
                    if not line:
                        continue
                    data = _loads(line, resp.status, self.url)
                    if "error" in data:
                        raise_for(500, data, self.url)
                    delta = TokenDelta(**data)
                    self._seen(delta.policy_version)
                    yield delta
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:   # ValueError: a line too long
            raise ServingError(f"engine at {self.url}/generate failed: {exc!r}") from exc

    async def score(self, prompt_ids: list[int], continuation_ids: list[int],
                    top_k: int = 0, base: bool = False) -> Scores:
        data = await self._post("/score", {"prompt_ids": prompt_ids, "continuation_ids": continuation_ids,
                                           "top_k": top_k, "base": base})
        return Scores(**data)

    async def load_weights(self, path: str, kind: WeightsKind, version: int) -> None:
        raise ServingError("weights are swapped by the reloader inside `nextstate serve`, "
                           "not through a remote engine")

    async def relabel(self, version: int) -> bool:
        return False   # as load_weights: the reloader inside `nextstate serve` does it

    async def close(self) -> None:
        for sessions in self._sessions.values():
            for session in sessions:
                try:
                    await session.close()
                except RuntimeError:   # made on another, now closed, loop
                    pass
        self._sessions.clear()
