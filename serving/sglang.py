"""The SGLang engine: an adapter over SGLang's native HTTP API, never an import of SGLang.

SGLang pins its own torch/CUDA, so it lives in its own Python environment: either we launch
``<sglang_python> -m sglang.launch_server`` as a child process (on 127.0.0.1, with
``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` so sampled-token logprobs are the raw temperature-1
model logprobs, the same convention as the local engine), or we attach to a running server
at ``sglang_url`` (then the logprob convention is whatever that server was started with;
`info().details["logprobs"]` says which we assume).

Requests go to ``/generate`` with ``input_ids`` (token-exact: no text, no chat template):
sampling uses ``return_logprob`` and reads ``meta_info.output_token_logprobs``
(``[logprob, token_id, text]`` triples); streaming reads SSE chunks and counts new tokens by
``meta_info.completion_tokens`` (cumulative in either of SGLang's streaming modes); scoring is
a prefill with ``max_new_tokens: 0`` and ``input_token_logprobs`` from the last prompt token.

Swaps. FULL: ``/update_weights_from_disk`` with ``weight_version``; SGLang takes a writer lock
that waits for the requests in flight (they finish on the old weights) and holds new ones
until the load is done (they wait, none is refused). LORA: ``/load_lora_adapter`` under the
name ``v<version>``; every request names the adapter of the policy it was pinned to, and a
superseded adapter is unloaded (``/unload_lora_adapter``) when its last request ends.
``score(base=True)`` sends no adapter (base weights) and is refused after a FULL swap (SGLang
holds one set of full weights).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from infra.errors import ContextLengthError, ServingError
from infra.http import async_client
from infra.settings import ServingSettings
from schemas.events import SamplingParams
from serving.engine import EngineInfo, Generation, Scores, TokenDelta, WeightsKind, register_engine

log = logging.getLogger(__name__)


def sampling_params(params: SamplingParams) -> dict[str, Any]:
    """Our SamplingParams as SGLang's ``sampling_params``."""
    out: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p,
                           "max_new_tokens": params.max_new_tokens,
                           # token-exact capture: SGLang must not drop the stop text/EOS
                           "no_stop_trim": True, "skip_special_tokens": False}
    if params.stop:
        out["stop"] = list(params.stop)
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    if params.top_k > 0:
        out["top_k"] = params.top_k
    if params.grammar:
        out["ebnf"] = params.grammar   # SGLang's grammar backend (xgrammar by default) reads it
    return out


def finish_reason(meta: dict[str, Any]) -> str | None:
    """SGLang's ``finish_reason`` ({"type": "stop"|"length"|"abort", ...} or null) as ours."""
    reason = meta.get("finish_reason")
    if reason is None:
        return None
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    return kind if kind in ("stop", "length", "abort") else "stop"


def new_tokens(meta: dict[str, Any], seen: int) -> list[tuple[int, float]]:
    """(token id, logprob) pairs a chunk adds beyond the `seen` ones already streamed."""
    triples = meta.get("output_token_logprobs") or []
    total = int(meta.get("completion_tokens", len(triples)))
    fresh = total - seen
    if fresh <= 0:
        return []
    if len(triples) < fresh:
        raise ServingError(f"SGLang chunk says {total} completion tokens but carries "
                           f"{len(triples)} logprobs after {seen} seen")
    return [(int(t[1]), float(t[0])) for t in triples[len(triples) - fresh:]]


class _Policy:
    def __init__(self, version: int, adapter: str | None) -> None:
        self.version, self.adapter, self.active = version, adapter, 0


@register_engine("sglang")
class SGLangEngine:
    """SGLang over HTTP; see the module docstring."""

    name = "sglang"

    def __init__(self, settings: ServingSettings, model_dir: str | Path | None = None,
                 initial_version: int = 0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self._transport = transport
        self._proc: subprocess.Popen | None = None
        self._clients: dict[int, httpx.AsyncClient] = {}
        if settings.sglang_url:
            self.url = settings.sglang_url.rstrip("/")
            self.model_dir = Path(model_dir) if model_dir else None
            self.logprobs = "as configured on the attached server"
        else:
            from serving.models import resolve_model

            self.model_dir = Path(model_dir) if model_dir else resolve_model(settings.model, settings.cache_dir)
            self.url = f"http://127.0.0.1:{settings.sglang_port}"
            self.logprobs = "raw (SGLANG_RETURN_ORIGINAL_LOGPROB=1)"
            self._proc = self._launch()
        self._current = _Policy(initial_version, None)
        self._full_swapped = False
        self._model_info: dict[str, Any] = {}
        self._max_context = 0
        self._ready = False

    # -- process and connection ----------------------------------------------------------

    def launch_command(self) -> list[str]:
        python = self.settings.sglang_python
        if python is None:
            raise ServingError("engine=sglang needs NEXTSTATE_SERVING__SGLANG_PYTHON (the python of "
                               "SGLang's own environment) or NEXTSTATE_SERVING__SGLANG_URL")
        return [str(python), "-m", "sglang.launch_server", "--model-path", str(self.model_dir),
                "--host", "127.0.0.1", "--port", str(self.settings.sglang_port),
                "--enable-lora", *self.settings.sglang_args]

    def _launch(self) -> subprocess.Popen:
        cmd = self.launch_command()
        if not Path(cmd[0]).exists():
            raise ServingError(f"SGLang python {cmd[0]} does not exist")
        env = {**os.environ, "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}
        log_path = self.settings.cache_dir / "sglang.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("launching SGLang: %s (log %s)", " ".join(cmd), log_path)
        with log_path.open("ab") as sink:
            return subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)

    def _client(self) -> httpx.AsyncClient:
        loop = id(asyncio.get_running_loop())
        client = self._clients.get(loop)
        if client is None:
            timeout = httpx.Timeout(self.settings.request_timeout_s, connect=10.0)
            client = async_client(self.url, timeout=timeout, transport=self._transport)
            self._clients[loop] = client
        return client

    async def start(self) -> None:
        """Wait until the server answers /health, then read its model info."""
        if self._ready:
            return
        deadline = time.monotonic() + self.settings.sglang_start_timeout_s
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise ServingError(f"SGLang exited with code {self._proc.returncode} while starting "
                                   f"(see {self.settings.cache_dir / 'sglang.log'})")
            try:
                if (await self._client().get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServingError(f"SGLang at {self.url} not healthy after "
                                   f"{self.settings.sglang_start_timeout_s:.0f}s")
            await asyncio.sleep(1.0)
        self._model_info = await self._get("/get_model_info")
        server = await self._get("/get_server_info")
        self._max_context = int(server.get("context_length") or server.get("max_req_input_len")
                                or self._model_info.get("context_length") or 0)
        self._ready = True

    async def _get(self, path: str) -> dict[str, Any]:
        resp = await self._client().get(path)
        return self._json(path, resp)

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self._client().post(path, json=body)
        except httpx.HTTPError as exc:
            raise ServingError(f"SGLang {path} at {self.url} failed: {exc!r}") from exc
        return self._json(path, resp)

    @staticmethod
    def _json(path: str, resp: httpx.Response) -> dict[str, Any]:
        if resp.status_code >= 400:
            raise ServingError(f"SGLang {path} answered {resp.status_code}: {resp.text[:300]}")
        try:
            return resp.json()
        except ValueError:
            return {"text": resp.text}

    # -- engine API ----------------------------------------------------------------------

    def info(self) -> EngineInfo:
        return EngineInfo(
            name=self.name,
            model=str(self.model_dir or self._model_info.get("model_path", self.url)),
            policy_version=self._current.version, max_context=self._max_context,
            details={"url": self.url, "logprobs": self.logprobs, "adapter": self._current.adapter,
                     "tokenizer": str(self.model_dir or self._model_info.get("tokenizer_path", "")),
                     "launched": self._proc is not None},
        )

    def _check_context(self, prompt_tokens: int, max_new: int) -> None:
        if self._max_context and prompt_tokens + max_new > self._max_context:
            raise ContextLengthError(prompt_tokens, max_new, self._max_context)

    def _pin(self, base: bool = False) -> _Policy:
        policy = _Policy(0, None) if base else self._current
        policy.active += 1
        return policy

    async def _unpin(self, policy: _Policy) -> None:
        policy.active -= 1
        if policy.active == 0 and policy.adapter and policy is not self._current:
            await self._unload(policy.adapter)

    def _request(self, prompt_ids: list[int], params: SamplingParams, policy: _Policy,
                 stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"input_ids": list(prompt_ids), "sampling_params": sampling_params(params),
                                "return_logprob": True, "stream": stream}
        if policy.adapter:
            body["lora_path"] = policy.adapter
        return body

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        ids, lps, finish, version = [], [], "length", self._current.version
        async for d in self.stream(prompt_ids, params):
            ids.append(d.token_id)
            lps.append(d.logprob)
            finish, version = d.finish_reason or finish, d.policy_version
        return Generation(ids, lps, finish, version, len(prompt_ids))

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        await self.start()
        self._check_context(len(prompt_ids), params.max_new_tokens)
        policy = self._pin()
        try:
            body = self._request(prompt_ids, params, policy, stream=True)
            async with self._client().stream("POST", "/generate", json=body) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise ServingError(f"SGLang /generate answered {resp.status_code}: {resp.text[:300]}")
                seen, pending = 0, None
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    meta = json.loads(data).get("meta_info", {})
                    if finish_reason(meta) == "abort":
                        raise ServingError(f"SGLang aborted the request: {meta.get('finish_reason')}")
                    version = _version(meta, policy)
                    done = finish_reason(meta)
                    fresh = new_tokens(meta, seen)
                    seen += len(fresh)
                    for i, (tok, lp) in enumerate(fresh):
                        # hold one token back so the last one can carry the finish reason
                        if pending is not None:
                            yield pending
                        last = done is not None and i == len(fresh) - 1
                        pending = TokenDelta(tok, lp, done if last else None, version)
                    if done is not None and pending is not None and pending.finish_reason is None:
                        pending = TokenDelta(pending.token_id, pending.logprob, done, version)
                if pending is not None:
                    if pending.finish_reason is None:
                        pending = TokenDelta(pending.token_id, pending.logprob, "length", pending.policy_version)
                    yield pending
        except httpx.HTTPError as exc:
            raise ServingError(f"SGLang /generate at {self.url} failed: {exc!r}") from exc
        finally:
            await self._unpin(policy)

    async def score(self, prompt_ids: list[int], continuation_ids: list[int],
                    top_k: int = 0, base: bool = False) -> Scores:
        await self.start()
        if not prompt_ids:
            raise ServingError("score needs at least one prompt token")
        if base and self._full_swapped:
            raise ServingError("score(base=True) on SGLang after a FULL swap: the server holds only "
                               "the new full weights")
        self._check_context(len(prompt_ids) + len(continuation_ids), 0)
        n = len(continuation_ids)
        if n == 0:
            return Scores([], [] if top_k else None, [] if top_k else None, self._current.version)
        policy = self._pin(base)
        try:
            body = {"input_ids": list(prompt_ids) + list(continuation_ids),
                    "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                    "return_logprob": True, "logprob_start_len": len(prompt_ids) - 1,
                    "top_logprobs_num": top_k, "stream": False}
            if policy.adapter:
                body["lora_path"] = policy.adapter
            meta = (await self._post("/generate", body)).get("meta_info", {})
        finally:
            await self._unpin(policy)
        rows = [r for r in meta.get("input_token_logprobs") or [] if r and r[0] is not None]
        if len(rows) < n:
            raise ServingError(f"SGLang returned {len(rows)} input logprobs for a {n}-token continuation")
        rows = rows[-n:]
        if [int(r[1]) for r in rows] != list(continuation_ids):
            raise ServingError("SGLang scored different token ids than the continuation sent")
        top_ids = top_lps = None
        if top_k:
            tops = (meta.get("input_top_logprobs") or [])[-n:]
            top_ids = [[int(t[1]) for t in row or []] for row in tops]
            top_lps = [[float(t[0]) for t in row or []] for row in tops]
        return Scores([float(r[0]) for r in rows], top_ids, top_lps, policy.version)

    async def load_weights(self, path: str, kind: WeightsKind, version: int) -> None:
        await self.start()
        if WeightsKind(kind) is WeightsKind.FULL:
            result = await self._post("/update_weights_from_disk", {
                "model_path": str(path), "weight_version": str(version),
                "abort_all_requests": False, "flush_cache": True})
            if not _truthy(result.get("success")):
                raise ServingError(f"SGLang refused weights {path}: {result.get('message')}")
            old, self._current = self._current, _Policy(version, None)
            self._full_swapped = True
        else:
            name = f"v{version}"
            result = await self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
            if not _truthy(result.get("success", True)):
                raise ServingError(f"SGLang refused adapter {path}: {result.get('error_message')}")
            old, self._current = self._current, _Policy(version, name)
        if old.adapter and old.active == 0:
            await self._unload(old.adapter)

    async def _unload(self, name: str) -> None:
        try:
            await self._post("/unload_lora_adapter", {"lora_name": name})
        except ServingError as exc:  # a leftover adapter costs memory, not correctness
            log.warning("could not unload adapter %s: %s", name, exc)

    async def pause(self, mode: str = "in_place") -> None:
        await self._post("/pause_generation", {"mode": mode})

    async def resume(self) -> None:
        await self._post("/continue_generation", {})

    async def flush_cache(self) -> None:
        await self._post("/flush_cache", {})

    async def relabel(self, version: int) -> bool:
        """An adapter's version is this client's label (SGLang knows it as a name), so the
        current adapter takes the new number; SGLang's cache is left as it is (the same
        weights). Full weights carry the version SGLang reports (`weight_version`): those are
        loaded again instead, and so are the start-up weights."""
        cur = self._current
        if version <= cur.version or cur.adapter is None:
            return False
        cur.version = version
        return True

    async def close(self) -> None:
        for client in self._clients.values():
            try:
                await client.aclose()
            except RuntimeError:  # its loop is already closed
                pass
        self._clients.clear()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                await asyncio.to_thread(self._proc.wait, 30)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def _version(meta: dict[str, Any], policy: _Policy) -> int:
    """The version that sampled: SGLang's ``weight_version`` when it reports one."""
    reported = meta.get("weight_version")
    if reported is not None and str(reported).isdigit() and policy.adapter is None:
        return int(reported)
    return policy.version
