"""Environments for the tests, registered on import (the worker subprocess imports this module
through ``envs.modules``, as a user's own environments would be)."""

from __future__ import annotations

import asyncio

from producers.envs.base import EnvError, Observation, Outcome, StepResult, Task, register_env
from schemas.events import FeedbackKind


@register_env("parity-test")
class ParityEnv:
    """Two steps; each 'runs' the reply (exit code = its length's parity); the outcome is +1
    when the replies' total length is a multiple of 3. Arbitrary, but a function of what the
    model said, so rollouts differ."""

    name = "parity-test"
    version = "t1"

    def __init__(self, max_steps: int = 4) -> None:
        self.total = 0
        self.steps = 0

    async def reset(self, task: Task):
        if task.spec.get("explode"):
            raise EnvError("this task is broken on purpose")
        self.raise_in_step = bool(task.spec.get("raise_in_step"))
        self.hang_verifier = bool(task.spec.get("hang_verifier"))
        return [{"role": "user", "content": task.spec["q"]}], []

    async def step(self, assistant):
        if self.raise_in_step:
            raise RuntimeError("the environment fell over")
        self.steps += 1
        n = len(assistant.get("content") or "")
        self.total += n
        obs = [Observation(FeedbackKind.TERMINAL_OUTPUT, f"ran {n} chars", exit_code=n % 2)]
        done = self.steps >= 2
        return StepResult(obs, [{"role": "user", "content": "go on"}], done, {"ended": "answered"} if done else {})

    async def evaluate(self):
        if self.hang_verifier:
            await asyncio.sleep(3600)
        value = 1.0 if self.total % 3 == 0 else -1.0
        return Outcome(value, "parity", "1", {"total": self.total}, value > 0)

    async def close(self):
        pass


@register_env("slow-test")
class SlowEnv(ParityEnv):
    """ParityEnv whose every step takes ``spec['sleep_s']`` seconds (a worker can be killed mid-group)."""

    name = "slow-test"

    async def reset(self, task: Task):
        self.sleep_s = float(task.spec.get("sleep_s", 1.0))
        return await super().reset(task)

    async def step(self, assistant):
        await asyncio.sleep(self.sleep_s)
        return await super().step(assistant)
