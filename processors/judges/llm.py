"""The `llm` judges: any OpenAI-compatible chat endpoint (the gateway, SGLang, an external API).

``ChatClient`` posts ``/chat/completions`` through httpx with a timeout per call, retries with
exponential backoff on connection errors, 429 and 5xx, and a semaphore that bounds the calls
in flight. The judges build their prompt (``processors.judges.prompts``: data fenced, the
instructions say it is data) and read only the judge's own final line
(``processors.voting``). A vote whose call failed records the error and no score; when every
call fails to reach the endpoint the judge raises ``JudgeUnavailable`` (the stage retries).

Knows nothing about Kafka.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import httpx

from infra.http import async_client
from infra.settings import ProcessorSettings
from processors.judges.prompts import JudgePrompt, hint_prompt, reward_prompt
from processors.voting import parse_final_answer, parse_hint
from schemas.events import HintVote, JudgeVote, TransitionFormed

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class Unreachable(Exception):
    """Every attempt failed to get an answer from the endpoint."""


@dataclass
class ChatClient:
    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    retries: int = 3
    concurrency: int = 8
    temperature: float = 0.6
    max_tokens: int = 1024
    backoff_s: float = 0.5
    transport: httpx.AsyncBaseTransport | None = None  # e.g. an in-process ASGI app
    _sem: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    _http: httpx.AsyncClient | None = field(default=None, init=False, repr=False)

    def _client(self) -> httpx.AsyncClient:
        # Created lazily inside the running loop (faust and tests each own theirs).
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = async_client(self.url, headers=headers, timeout=self.timeout_s, transport=self.transport)
            self._sem = asyncio.Semaphore(self.concurrency)
        return self._http

    async def complete(self, messages: list[dict[str, str]]) -> str:
        """The assistant's text for `messages`; raises Unreachable after the last retry."""
        http = self._client()
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "stream": False}
        # one id for every attempt of this call: a nextstate gateway as the judge's endpoint
        # answers a retry with its first answer instead of recording the call twice
        headers = {"X-Request-Id": uuid.uuid4().hex}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                async with self._sem:
                    resp = await http.post("/chat/completions", json=body, headers=headers)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code in RETRY_STATUS:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                raise ValueError(f"judge endpoint answered HTTP {resp.status_code}: {resp.text[:300]}")
            try:
                return resp.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise ValueError(f"judge endpoint answer is not a chat completion: {resp.text[:300]}") from exc
        raise Unreachable(f"{self.url} unreachable after {self.retries + 1} attempt(s): {last}")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def client_from_settings(s: ProcessorSettings) -> ChatClient:
    if not s.judge_url or not s.judge_model:
        raise ValueError("the llm judge needs processors.judge_url and processors.judge_model "
                         f"(got url={s.judge_url!r}, model={s.judge_model!r})")
    return ChatClient(
        url=s.judge_url, model=s.judge_model,
        api_key=s.judge_api_key.get_secret_value() if s.judge_api_key else None,
        timeout_s=s.judge_timeout_s, retries=s.judge_retries, concurrency=s.judge_concurrency,
        temperature=s.judge_temperature, max_tokens=s.judge_max_tokens,
    )


async def _ask(client: ChatClient, prompt: JudgePrompt) -> tuple[str | None, str | None, float]:
    start = time.perf_counter()
    try:
        text, error = await client.complete(prompt.messages), None
    except Unreachable as exc:
        text, error = None, f"unreachable: {exc}"
    except ValueError as exc:
        text, error = None, str(exc)
    return text, error, (time.perf_counter() - start) * 1000


class LLMRewardJudge:
    name = "llm"
    version = "reward-prompt-v1"

    def __init__(self, client: ChatClient) -> None:
        self.client = client
        self.model = client.model

    def prompt(self, transition: TransitionFormed) -> JudgePrompt:
        return reward_prompt(transition)

    async def vote(self, transition: TransitionFormed, prompt: JudgePrompt, index: int) -> JudgeVote:
        text, error, ms = await _ask(self.client, prompt)
        if text is None:
            return JudgeVote(index=index, raw_text="", latency_ms=ms, error=error)
        score, why = parse_final_answer(text)
        return JudgeVote(index=index, raw_text=text, score=score, latency_ms=ms, error=why)


class LLMHintJudge:
    name = "llm"
    version = "hint-prompt-v1"

    def __init__(self, client: ChatClient) -> None:
        self.client = client
        self.model = client.model

    def prompt(self, transition: TransitionFormed) -> JudgePrompt:
        return hint_prompt(transition)

    async def vote(self, transition: TransitionFormed, prompt: JudgePrompt, index: int) -> HintVote:
        text, error, ms = await _ask(self.client, prompt)
        if text is None:
            return HintVote(index=index, raw_text="", latency_ms=ms, error=error)
        score, why = parse_final_answer(text)
        hint = parse_hint(text) if score == 1 else None
        return HintVote(index=index, raw_text=text, score=score, hint=hint, latency_ms=ms, error=why)

