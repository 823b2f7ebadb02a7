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

import httpx
import orjson

from infra.errors import ContextLengthError, ServingError
from infra.http import async_client
from infra.settings import ServingSettings
from schemas.events import SamplingParams
from serving.engine import EngineInfo, Generation, Scores, TokenDelta, WeightsKind, register_engine


def raise_for(status: int, payload: Any, url: str) -> None:
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        raise ServingError(f"engine at {url} answered {status}: {str(payload)[:300]}")
    if err.get("type") == "ContextLengthError":
        raise ContextLengthError(err["prompt_tokens"], err["max_new_tokens"], err["max_context"])
    raise ServingError(f"engine at {url}: {err.get('type')}: {err.get('message')}")


@register_engine("remote")
class RemoteEngine:
    name = "remote"

    def __init__(self, settings: ServingSettings, model_dir: str | Path | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not settings.engine_url:
            raise ServingError("engine=remote needs NEXTSTATE_SERVING__ENGINE_URL "
                               "(the address of `nextstate serve`)")
        self.url = settings.engine_url.rstrip("/")
        self.settings = settings
        self._transport = transport
        self._clients: dict[int, httpx.AsyncClient] = {}
        self._info: EngineInfo | None = None
        self._sync_info()

    def _headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}

    def _sync_info(self) -> None:
        """Read /info once at construction (blocking), so info() works before any request."""
        if self._transport is not None:
            return  # tests drive it through start()
        try:
            resp = httpx.get(self.url + "/info", headers=self._headers(), timeout=30)
        except httpx.HTTPError as exc:
            raise ServingError(f"engine at {self.url} unreachable: {exc!r}") from exc
        self._info = self._parse_info(resp)

    def _parse_info(self, resp: httpx.Response) -> EngineInfo:
        data = resp.json()
        if resp.status_code >= 400:
            raise_for(resp.status_code, data, self.url)
        return EngineInfo(**data)

    async def start(self) -> None:
        self._info = self._parse_info(await self._client().get("/info"))

    def _client(self) -> httpx.AsyncClient:
        loop = id(asyncio.get_running_loop())
        client = self._clients.get(loop)
        if client is None:
            # /generate records nothing, so a request lost to a closing idle connection is
            # safely sent again (infra.http).
            client = async_client(self.url, headers=self._headers(), transport=self._transport,
                                  timeout=httpx.Timeout(self.settings.request_timeout_s, connect=10.0))
            self._clients[loop] = client
        return client

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
            resp = await self._client().post(path, content=orjson.dumps(body),
                                             headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            raise ServingError(f"engine at {self.url}{path} failed: {exc!r}") from exc
        data = resp.json()
        if resp.status_code >= 400:
            raise_for(resp.status_code, data, self.url)
        return data

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        data = await self._post("/generate", {"prompt_ids": prompt_ids, "params": params.model_dump(),
                                              "stream": False})
        self._seen(data["policy_version"])
        return Generation(**data)

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        body = orjson.dumps({"prompt_ids": prompt_ids, "params": params.model_dump(), "stream": True})
        try:
            async with self._client().stream("POST", "/generate", content=body,
                                             headers={"content-type": "application/json"}) as resp:
                if resp.status_code >= 400:
                    raise_for(resp.status_code, orjson.loads(await resp.aread()), self.url)
                async for line in resp.aiter_lines():
                    if not line:
                        continue
                    data = orjson.loads(line)
                    if "error" in data:
                        raise_for(500, data, self.url)
                    delta = TokenDelta(**data)
                    self._seen(delta.policy_version)
                    yield delta
        except httpx.HTTPError as exc:
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
        for client in self._clients.values():
            try:
                await client.aclose()
            except RuntimeError:
                pass
        self._clients.clear()
