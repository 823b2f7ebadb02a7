"""What an environment is: one small async protocol, and a registry by name.

    reset(task)        -> the opening messages and the tools the agent may call
    step(assistant)    -> what the world answered (observations: the next state), done, info
    evaluate()         -> the rollout's outcome in [-1, 1], with the verifier that decided it
    close()            -> release what the rollout held (sandboxes, browsers, files)

An environment instance plays one rollout of one task. The runner (which talks to the
gateway) owns the conversation: it sends the messages, gets the assistant's message back,
hands it to `step`, appends the messages `step` returns, and records each observation as the
next state of the step that caused it. Environments register themselves with `register_env`;
`create_env(name)` builds one. Knows nothing about HTTP or Kafka.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from infra.errors import NextstateError
from schemas.events import FeedbackKind


class EnvError(NextstateError):
    """An environment that cannot play a task (a malformed task, a broken tool)."""


@dataclass(frozen=True)
class Task:
    """One task to roll out: which environment, its spec (environment-specific: a question and
    its answer, a repository and its tests...), and a seed."""

    task_id: str
    env: str
    spec: dict[str, Any]
    seed: int = 0

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Observation:
    """One piece of the next state, as feedback records it."""

    kind: FeedbackKind
    text: str
    exit_code: int | None = None
    passed: bool | None = None


@dataclass
class StepResult:
    observations: list[Observation]
    messages: list[dict[str, Any]]        # appended to the conversation (tool results, a nudge)
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    value: float                  # in [-1, 1]
    verifier: str
    verifier_version: str
    raw: dict[str, Any]           # what the verifier saw and said
    correct: bool | None = None


class Environment(Protocol):
    name: ClassVar[str]
    version: ClassVar[str]

    async def reset(self, task: Task) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]: ...

    async def step(self, assistant: dict[str, Any]) -> StepResult: ...

    async def evaluate(self) -> Outcome: ...

    async def close(self) -> None: ...


ENVIRONMENTS: dict[str, Callable[..., Environment]] = {}
TASKS: dict[str, Callable[[int, int], list[Task]]] = {}   # env name -> (n, seed) -> tasks


def register_env(name: str, tasks: Callable[[int, int], list[Task]] | None = None) -> Callable[[type], type]:
    """Register an environment class by name, and optionally its task generator (n, seed)."""
    def add(cls: type) -> type:
        ENVIRONMENTS[name] = cls
        if tasks is not None:
            TASKS[name] = tasks
        return cls

    return add


def builtin() -> None:
    """Import the environments shipped here (each registers itself)."""
    from producers.envs import toolcall  # noqa: F401


def load_modules(modules: list[str]) -> None:
    """Import the user's environment modules (``envs.modules``: dotted names on the Python
    path); each registers its environments with `register_env`. EnvError names one that fails."""
    import importlib

    builtin()
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:   # noqa: BLE001 - any import failure is the user's module
            raise EnvError(f"environment module {name!r} could not be imported: {type(exc).__name__}: {exc}") from None


def generate(name: str, n: int, seed: int = 0) -> list[Task]:
    builtin()
    if name not in TASKS:
        known = ", ".join(sorted(TASKS)) or "none"
        raise EnvError(f"environment {name!r} has no task generator (those that do: {known}); "
                       "give tasks as a JSONL file instead")
    return TASKS[name](n, seed)


def create_env(name: str, **options: Any) -> Environment:
    builtin()
    try:
        factory = ENVIRONMENTS[name]
    except KeyError:
        raise EnvError(f"no environment named {name!r}; known: {', '.join(sorted(ENVIRONMENTS))}") from None
    return factory(**options)
