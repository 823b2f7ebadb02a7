"""Simulated users talking to a gateway like any OpenAI-compatible client.

A session: the persona asks a question; the agent answers; the persona reacts in words (a
correction or thanks), which is the next user message and so the next state of the first
turn; the agent answers again; the persona gives thumbs on that answer and the session ends.
Probes are side turns (served and recorded, never trained on), greedy, one per question:
first-response satisfaction is the share of personas the answer satisfies
(Persona.satisfied_by: the question, the answer's text, and whether the token limit cut it off).

Talks HTTP only (httpx), so the same harness works against a GPU deployment.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field

from infra.http import async_client
from producers.simulated.personas import Persona, satisfaction


@dataclass(frozen=True)
class Answer:
    text: str
    policy_version: int
    session_id: str
    finished: bool = True   # False: cut off at the token limit (finish_reason "length")


@dataclass(frozen=True)
class SessionResult:
    persona: str
    question: str
    first: Answer
    first_satisfied: bool
    second_satisfied: bool


@dataclass
class ProbeResult:
    policy_version: int
    satisfaction: float
    per_persona: dict[str, float] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)


class GatewayUsers:
    def __init__(self, base_url: str, api_key: str, *, max_tokens: int = 64, temperature: float = 1.0,
                 system_prompt: str | None = None, timeout_s: float = 300.0) -> None:
        # Pooled connections expire before the gateway closes them, and a request that died
        # on a connection the server was closing is sent once more with the same request id:
        # the gateway answers a repeated id with its first answer and records it once.
        self.client = async_client(base_url, timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"})
        self.max_tokens, self.temperature, self.system_prompt = max_tokens, temperature, system_prompt

    async def close(self) -> None:
        await self.client.aclose()

    async def chat(self, messages: list[dict], session_id: str, *, turn_type: str = "main",
                   temperature: float | None = None, seed: int | None = None, done: bool = False,
                   max_tokens: int | None = None) -> Answer:
        headers = {"X-Session-Id": session_id, "X-Turn-Type": turn_type, "X-Request-Id": uuid.uuid4().hex}
        if done:
            headers["X-Session-Done"] = "1"
        body = {"model": "policy", "messages": self._with_system(messages),
                "max_completion_tokens": max_tokens or self.max_tokens,
                "temperature": self.temperature if temperature is None else temperature}
        if seed is not None:
            body["seed"] = seed
        r = await self.client.post("/v1/chat/completions", json=body, headers=headers)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return Answer(choice["message"]["content"] or "", int(r.headers.get("X-Policy-Version", "0")),
                      session_id, choice.get("finish_reason") != "length")

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt:
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    async def serving_version(self) -> int:
        """The policy version the gateway serves now."""
        r = await self.client.get("/healthz")
        r.raise_for_status()
        return int(r.json().get("policy_version", 0))

    async def feedback(self, session_id: str, **fields) -> None:
        r = await self.client.post("/v1/feedback", json={"session_id": session_id, **fields},
                                   headers={"X-Request-Id": uuid.uuid4().hex})
        r.raise_for_status()

    async def session(self, persona: Persona, question: str, rng: random.Random) -> SessionResult:
        sid = f"sim-{persona.name}-{uuid.uuid4().hex[:10]}"
        seed = rng.randrange(2**31)
        history = [{"role": "user", "content": question}]
        first = await self.chat(history, sid, seed=seed)
        reaction = persona.react(question, first.text, rng, first.finished)
        history += [{"role": "assistant", "content": first.text},
                    {"role": "user", "content": reaction.text}]
        second = await self.chat(history, sid, seed=seed + 1)
        closing = persona.react(question, second.text, rng, second.finished)
        await self.feedback(sid, kind="thumbs", thumbs=closing.thumbs, text=closing.text,
                            source=f"simulated:{persona.name}")
        r = await self.client.post(f"/v1/sessions/{sid}/end", headers={"X-Request-Id": uuid.uuid4().hex})
        r.raise_for_status()
        return SessionResult(persona.name, question, first, reaction.satisfied, closing.satisfied)

    async def probe(self, questions: list[str], personas: list[Persona],
                    max_tokens: int | None = None, temperature: float = 0.0, samples: int = 1,
                    seed: int = 0, asked: list[str] | None = None) -> ProbeResult:
        """First responses to held-out questions, as side turns (never trained on): greedy by
        default, or `samples` answers to each question at `temperature` (seeded, so two
        policies meet the same draws). Probes get more room than training turns, so that what
        is judged is mostly whole answers; a cut-off one does not pass for brief. `asked`: the
        questions as the persona would ask them, when the messages sent carry more (a hint);
        whether an answer answers is judged against these."""
        answers = await asyncio.gather(*(
            self.chat([{"role": "user", "content": q}], f"probe-{uuid.uuid4().hex[:10]}",
                      turn_type="side", temperature=temperature, done=True, max_tokens=max_tokens,
                      seed=None if temperature == 0.0 else seed + 1000 * i + k)
            for i, q in enumerate(questions) for k in range(samples)))
        n = len(answers)
        asked = [q for q in (asked or questions) for _ in range(samples)]   # in the order of `answers`
        return ProbeResult(
            policy_version=min(a.policy_version for a in answers),
            satisfaction=sum(satisfaction(q, a.text, personas, a.finished) for q, a in zip(asked, answers)) / n,
            per_persona={p.name: sum(p.satisfied_by(q, a.text, a.finished) for q, a in zip(asked, answers)) / n
                         for p in personas},
            answers=[a.text for a in answers],
        )
