"""The rollout runner: a task played n times through the gateway's OpenAI API, every step's next
state recorded.

One rollout (``play``) is one session of the gateway, named ``<group>.<attempt>.<k>``:

1. EpisodeStarted goes to the ``episodes`` topic (keyed by the group, schemas.events.session_key).
2. ``env.reset(task)`` gives the opening messages and tools. Each step sends the conversation to
   ``POST /v1/chat/completions`` with the episode headers (X-Task-Id, X-Group-Id,
   X-Rollout-Index, X-Env, X-Env-Version, X-Attempt), so the gateway records the turn token-exact
   with its episode, whichever engine serves it (local, remote, SGLang). The assistant's message
   goes to ``env.step`` (with ``envs.prefill`` the reply continues that text, sent as a final
   assistant message: the environment sees prefill + reply); each observation becomes feedback
   for that turn (``POST /v1/feedback``: tool output, terminal output with its exit code, test
   result), the messages it returns are appended, and the next step begins, until the
   environment says done or ``max_steps``.
3. The session is ended (``POST /v1/sessions/<id>/end``), ``env.evaluate()`` gives the outcome,
   and EpisodeEnded records it with how the rollout ended:

| ended       | when                                                   | outcome               |
|-------------|--------------------------------------------------------|-----------------------|
| ANSWERED    | the environment said done (the agent answered)         | the verifier's        |
| STEP_LIMIT  | ``max_steps`` turns, or the context is full            | the verifier's        |
| TIME_LIMIT  | ``episode_wall_s`` passed                              | the verifier's        |
| ERROR       | the task, the environment, the gateway or the verifier failed (``detail`` says which) | 0, not trained on |

``steps`` is the number of turns the gateway recorded (from the turn index it returns), so the
group stage knows which transitions make the rollout. Whatever happens, the environment is
closed and EpisodeEnded is sent: a group never waits for a rollout that died silently.

With ``record=False`` (evaluation) nothing trains on the rollouts: the turns are side turns, no
feedback, session end or episode event is sent; the outcomes are only returned.

``run_group`` plays a task's n rollouts concurrently (bounded by ``concurrency`` across the
process) and returns when every EpisodeEnded is delivered. Knows nothing about faust.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import math
import re
import secrets
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from infra.settings import EnvSettings
from producers.envs.base import ENVIRONMENTS, EnvError, Observation, Outcome, Task, create_env
from schemas.events import EpisodeEnd, EpisodeEnded, EpisodeStarted, Event, TaskIssued

log = logging.getLogger("nextstate.envs")


class EpisodeSink(Protocol):
    """Where EpisodeStarted/EpisodeEnded go (infra.kafka.EventProducer, or a list in tests)."""

    def send(self, event: Event, key: str | bytes | None = None) -> None: ...

    def flush(self, timeout: float = 30.0) -> int: ...


class GatewayFailed(Exception):
    """The gateway refused or failed a request the rollout needed."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"gateway answered {status}: {message}")
        self.status, self.code = status, code


@dataclass(frozen=True)
class Rollout:
    task: Task
    group_id: str
    index: int
    attempt: int
    group_size: int

    @property
    def session_id(self) -> str:
        return f"{self.group_id}.{self.attempt}.{self.index}"

    def request_id(self, nonce: str, *what: object) -> str:
        """An idempotency key for one request of this rollout, unique to one runner (`nonce`): a
        retry repeats it, a second run of the same task never does (the gateway would replay
        the first run's answer). The gateway takes 1-128 of letters, digits and . _ : -."""
        digest = hashlib.sha256(self.session_id.encode()).hexdigest()[:24]
        return ".".join([nonce, digest, *(str(w) for w in what)])


@dataclass
class Played:
    """A rollout as it went: its EpisodeEnded and what a summary needs."""

    ended: EpisodeEnded
    tool_runs: int = 0
    correct: bool | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)


def env_options(name: str, settings: EnvSettings) -> dict[str, Any]:
    """The settings an environment's constructor accepts (max_steps, shaped_outcome, ...)."""
    factory = ENVIRONMENTS.get(name)
    if factory is None:
        create_env(name)   # imports the built-in environments, or raises EnvError naming the known ones
        factory = ENVIRONMENTS[name]
    accepted = inspect.signature(factory).parameters
    offered = {"max_steps": settings.max_steps, "shaped_outcome": settings.shaped_outcome,
               "allow_weak_sandbox": settings.allow_weak_sandbox}
    return {k: v for k, v in offered.items() if k in accepted}


_ID = re.compile(r"[\x21-\x7e]{1,200}")


def check_id(kind: str, value: str) -> str:
    """Task and group ids travel in HTTP headers and name sessions: printable ASCII without
    spaces, 1-200 characters (the gateway keeps 256 of a session id: `<group>.<attempt>.<k>`)."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise EnvError(f"{kind} {str(value)[:60]!r} must be 1-200 printable ASCII characters without spaces")
    return value


def task_of(issued: TaskIssued) -> Task:
    """The Task a TaskIssued event describes; EnvError if its ids or its spec will not do."""
    check_id("task id", issued.task_id)
    check_id("group id", issued.group_id)
    if not 1 <= issued.group_size <= 1024:
        raise EnvError(f"task {issued.task_id}: group_size must be 1-1024, got {issued.group_size}")
    try:
        spec = json.loads(issued.spec_json)
    except ValueError as exc:
        raise EnvError(f"task {issued.task_id}: spec_json is not JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise EnvError(f"task {issued.task_id}: spec_json must be a JSON object, got {type(spec).__name__}")
    return Task(issued.task_id, issued.env, spec, issued.seed)


def issued(task: Task, group_id: str, group_size: int, tenant: str = "default") -> TaskIssued:
    spec = json.dumps(task.spec, sort_keys=True)
    return TaskIssued(task_id=task.task_id, group_id=group_id, env=task.env, spec_json=spec,
                      spec_sha256=task.spec_hash(), group_size=group_size, seed=task.seed, tenant=tenant)


class Runner:
    def __init__(self, client: httpx.AsyncClient, sink: EpisodeSink, settings: EnvSettings,
                 model: str = "nextstate", tenant: str = "default", record: bool = True) -> None:
        self.client, self.sink, self.s = client, sink, settings
        self.model, self.tenant, self.record = model, tenant, record
        self.nonce = secrets.token_hex(6)
        self.slots = asyncio.Semaphore(settings.concurrency)

    # -- the gateway ------------------------------------------------------------------------
    async def _post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        try:
            r = await self.client.post(path, json=body, headers=headers, timeout=self.s.request_timeout_s)
        except httpx.HTTPError as exc:
            raise GatewayFailed(0, f"{type(exc).__name__}: {exc}") from None
        if r.status_code != 200:
            try:
                err = r.json().get("error") or {}
            except ValueError:
                err = {}
            raise GatewayFailed(r.status_code, err.get("message") or r.text[:300], err.get("code"))
        return r.json()

    async def _observe(self, ro: Rollout, turn_index: int, i: int, obs: Observation, env: str) -> None:
        body = {"session_id": ro.session_id, "kind": obs.kind.value, "turn_index": turn_index,
                "text": obs.text, "exit_code": obs.exit_code, "passed": obs.passed,
                "group_id": ro.group_id, "source": f"env:{env}"}
        await self._post("/v1/feedback", {k: v for k, v in body.items() if v is not None},
                         {"X-Request-Id": ro.request_id(self.nonce, "fb", turn_index, i)})

    def _send(self, event: Event, ro: Rollout) -> None:
        try:
            self.sink.send(event, key=ro.group_id)
        except Exception as exc:   # noqa: BLE001 - said loudly; run_group's flush raises on delivery
            log.error("could not queue %s of %s: %s", type(event).__name__, ro.session_id, exc)
            raise

    # -- one rollout --------------------------------------------------------------------------
    async def play(self, ro: Rollout) -> Played:
        async with self.slots:
            return await self._play(ro)

    async def _play(self, ro: Rollout) -> Played:
        task, s = ro.task, self.s
        env = None
        steps, tool_runs, messages = 0, 0, []
        first: int | None = None   # the gateway's index of the rollout's first turn
        ended, detail, outcome = EpisodeEnd.ERROR, None, None
        env_version = ""
        try:
            env = create_env(task.env, **env_options(task.env, s))
            env_version = getattr(env, "version", "")
        except Exception as exc:   # noqa: BLE001 - an unknown or broken environment ends the rollout
            detail = f"environment {task.env!r} could not be created: {exc}"
        if self.record:
            self._send(EpisodeStarted(
                task_id=task.task_id, group_id=ro.group_id, rollout_index=ro.index, attempt=ro.attempt,
                session_id=ro.session_id, env=task.env, env_version=str(env_version), spec_sha256=task.spec_hash(),
                seed=task.seed, group_size=ro.group_size,
                sandbox=str(getattr(getattr(env, "sandbox", None), "isolation", ""))), ro)
        headers = {"X-Session-Id": ro.session_id, "X-Task-Id": task.task_id, "X-Group-Id": ro.group_id,
                   "X-Rollout-Index": str(ro.index), "X-Attempt": str(ro.attempt), "X-Env": task.env,
                   "X-Env-Version": env_version}
        if not self.record:
            headers["X-Turn-Type"] = "side"
        started = time.monotonic()
        if env is not None:
            try:
                async with asyncio.timeout(s.episode_wall_s):
                    messages, tools = await env.reset(task)
                    ended = EpisodeEnd.STEP_LIMIT
                    for _ in range(s.max_steps):
                        body = {"model": self.model, "messages": messages, "max_tokens": s.max_tokens,
                                "temperature": s.temperature}
                        if s.prefill:
                            body["messages"] = [*messages, {"role": "assistant", "content": s.prefill}]
                            body["continue_final_message"] = True
                        if tools:
                            body["tools"] = tools
                        try:
                            reply = await self._post("/v1/chat/completions", body,
                                                     {**headers, "X-Request-Id": ro.request_id(self.nonce, "turn", steps)})
                        except GatewayFailed as exc:
                            if exc.code == "context_length_exceeded":
                                detail = "the conversation filled the model's context"
                                break
                            raise
                        index = int((reply.get("nextstate") or {}).get("turn_index", (first or 0) + steps))
                        first = index if first is None else first
                        steps = index - first + 1
                        message = reply["choices"][0]["message"]
                        assistant = {"role": "assistant", "content": (s.prefill or "") + (message.get("content") or "")}
                        if message.get("tool_calls"):
                            assistant["tool_calls"] = message["tool_calls"]
                        result = await env.step(assistant)
                        for i, obs in enumerate(result.observations if self.record else ()):
                            await self._observe(ro, steps - 1, i, obs, task.env)
                        messages = [*messages, assistant, *result.messages]
                        if result.done:
                            ended = (EpisodeEnd.STEP_LIMIT if result.info.get("ended") == "step_limit"
                                     else EpisodeEnd.ANSWERED)
                            break
            except TimeoutError:
                ended, detail = EpisodeEnd.TIME_LIMIT, f"the rollout ran past {s.episode_wall_s:.0f}s"
            except GatewayFailed as exc:
                ended, detail = EpisodeEnd.ERROR, str(exc)
            except Exception as exc:   # noqa: BLE001 - an environment that raises ends its rollout, not the runner
                ended, detail = EpisodeEnd.ERROR, f"{type(exc).__name__}: {exc}"
                log.warning("rollout %s of task %s failed: %s", ro.session_id, task.task_id, detail)
        if steps and self.record:
            try:
                await self._post(f"/v1/sessions/{quote(ro.session_id, safe='')}/end", {},
                                 {"X-Group-Id": ro.group_id, "X-Request-Id": ro.request_id(self.nonce, "end")})
            except GatewayFailed as exc:
                log.warning("ending session %s: %s", ro.session_id, exc)
        judged: Outcome | None = None
        if env is not None and ended is not EpisodeEnd.ERROR:
            try:
                judged = await asyncio.wait_for(env.evaluate(), s.verifier_timeout_s)
                outcome = float(judged.value)
                if not math.isfinite(outcome):
                    raise ValueError(f"an outcome must be a number in [-1, 1], got {judged.value!r}")
                outcome = max(-1.0, min(1.0, outcome))
            except TimeoutError:
                judged, outcome = None, None
                ended, detail = EpisodeEnd.ERROR, f"the verifier ran past {s.verifier_timeout_s:.0f}s"
            except Exception as exc:   # noqa: BLE001
                judged, outcome = None, None
                ended, detail = EpisodeEnd.ERROR, f"the verifier failed: {type(exc).__name__}: {exc}"
        raw = judged.raw if judged is not None and isinstance(judged.raw, dict) else {}
        try:
            tool_runs = int(raw.get("tool_runs", 0))
            result_json = json.dumps(raw, default=str) if judged else None
        except (TypeError, ValueError) as exc:
            tool_runs, result_json = 0, json.dumps({"unserialisable": str(exc)})
        event = EpisodeEnded(
            task_id=task.task_id, group_id=ro.group_id, rollout_index=ro.index, attempt=ro.attempt,
            session_id=ro.session_id, outcome=outcome if outcome is not None else 0.0,
            verifier=str(judged.verifier) if judged else "", verifier_version=str(judged.verifier_version) if judged else "",
            verifier_result_json=result_json, ended=ended, detail=detail, steps=steps, tenant=self.tenant,
            group_size=ro.group_size, first_turn_index=first if first is not None else 0)
        if self.record:
            self._send(event, ro)
        if env is not None:   # after EpisodeEnded is out: a teardown that hangs holds up no group
            try:
                await asyncio.wait_for(env.close(), 30.0)
            except Exception as exc:   # noqa: BLE001 - including a timeout
                log.warning("closing the environment of %s: %s", ro.session_id, exc or type(exc).__name__)
        log.info("rollout %s: %s in %d steps, outcome %s (%.1fs)%s", ro.session_id, ended.value, steps,
                 event.outcome, time.monotonic() - started, f": {detail}" if detail else "")
        return Played(event, tool_runs, judged.correct if judged else None, messages)

    # -- groups -----------------------------------------------------------------------------
    async def run_group(self, task: Task, group_id: str, n: int, attempt: int = 0) -> list[Played]:
        """Play the task's n rollouts and wait until every EpisodeEnded is delivered."""
        check_id("task id", task.task_id)
        check_id("group id", group_id)
        played = await asyncio.gather(*(self.play(Rollout(task, group_id, k, attempt, n)) for k in range(n)))
        if self.record:
            await asyncio.to_thread(self.sink.flush, 60.0)
        return list(played)

    async def run_tasks(self, tasks: Sequence[Task], n: int, attempt: int = 0,
                        group_prefix: str = "") -> list[list[Played]]:
        """Every task's group, all in flight together (the semaphore bounds the rollouts)."""
        groups = [self.run_group(t, f"{group_prefix}{t.task_id}", n, attempt) for t in tasks]
        return list(await asyncio.gather(*groups))
