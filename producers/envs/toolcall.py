"""The tool-call environment: arithmetic and word problems solved with a Python tool.

Tasks are generated here from a seed (`generate_tasks`), so no data set is downloaded: each
spec holds the question and its exact answer. The agent gets one tool, `python` (argument
`code`), run in the sandbox (producers.envs.sandbox: no network, rlimits, a wall clock); a
fenced ```python block in the assistant's text counts as a call too, for models that write
code rather than tool calls. Each run is an observation (TOOL_OUTPUT with its exit code) and
its output goes back to the agent as the tool's answer.

The rollout ends when the agent answers without code, or at `max_steps`. The answer is the
number after "Answer:" (or in \\boxed{}) of the final text, else the last number of that text,
else the last number the last successful run printed. The verifier compares numbers exactly
(integers) or within 1e-6 (decimals); the outcome is +1 when right, and when wrong
`processors.advantages.toolcall_outcome` (a little less negative the more the tool was used),
or −1 with `shaped_outcome=False`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from processors.advantages import toolcall_outcome
from producers.envs.base import EnvError, Observation, Outcome, StepResult, Task, register_env
from producers.envs.sandbox import Limits, Sandbox
from schemas.events import FeedbackKind

SYSTEM = ("You solve math problems. You can run Python with the `python` tool (or a ```python code block); "
          "its printed output comes back to you. When you know the result, reply `Answer: <number>`.")
PYTHON_TOOL = {"type": "function", "function": {
    "name": "python", "description": "Run Python 3 code and return what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "the program"}},
                   "required": ["code"]}}}

_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)
_ANSWER = re.compile(r"(?:answer\s*[:=]\s*|\\boxed\{\s*)(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")

_WORD = [
    ("A shop sells pens at {a} dollars each. Sam buys {b} pens and pays with {c} dollars. "
     "How many dollars of change does he get?", lambda a, b, c: c - a * b, lambda r: (r.randint(2, 9), r.randint(3, 12), 200)),
    ("A train travels at {a} km per hour for {b} hours, then {c} km more. How many km does it travel?",
     lambda a, b, c: a * b + c, lambda r: (r.randint(40, 120), r.randint(2, 9), r.randint(10, 99))),
    ("{a} boxes hold {b} apples each, and {c} apples are eaten. How many apples are left?",
     lambda a, b, c: a * b - c, lambda r: (r.randint(3, 20), r.randint(6, 24), r.randint(1, 30))),
    ("A garden is {a} m long and {b} m wide. A path of {c} square meters is paved. "
     "How many square meters are not paved?", lambda a, b, c: a * b - c, lambda r: (r.randint(10, 60), r.randint(5, 40), r.randint(5, 49))),
]


def generate_tasks(n: int, seed: int = 0, kinds: tuple[str, ...] = ("arithmetic", "word"),
                   prefix: str = "toolcall") -> list[Task]:
    """`n` tasks, the same for the same seed: products and sums of 2-3 digit numbers, and
    short word problems over the same operations."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "arithmetic":
            a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(100, 999)
            question, answer = f"What is {a} * {b} + {c}?", a * b + c
        elif kind == "word":
            template, solve, draw = _WORD[rng.randrange(len(_WORD))]
            a, b, c = draw(rng)
            question, answer = template.format(a=a, b=b, c=c), solve(a, b, c)
        else:
            raise EnvError(f"unknown tool-call task kind {kind!r}; known: arithmetic, word")
        tasks.append(Task(f"{prefix}-{seed}-{i}", "toolcall", {"question": question, "answer": answer, "kind": kind},
                          seed=seed * 100_003 + i))
    return tasks


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_answer(text: str) -> float | None:
    """The number the text answers with: after "Answer:" or in \\boxed{}, else its last number."""
    marked = _ANSWER.findall(text)
    if marked:
        return parse_number(marked[-1])
    numbers = [parse_number(n) for n in _NUMBER.findall(text)]
    numbers = [n for n in numbers if n is not None]
    return numbers[-1] if numbers else None


def verify(got: float | None, want: float) -> bool:
    if got is None:
        return False
    return abs(got - want) <= 1e-6 * max(1.0, abs(want))


@register_env("toolcall", tasks=lambda n, seed: generate_tasks(n, seed))
@dataclass
class ToolCallEnv:
    name: ClassVar[str] = "toolcall"
    version: ClassVar[str] = "1"

    max_steps: int = 4
    shaped_outcome: bool = True
    limits: Limits = field(default_factory=lambda: Limits(wall_s=10, cpu_s=5, output_bytes=8 << 10))
    allow_weak_sandbox: bool = False
    task: Task | None = field(default=None, init=False)
    runs: int = field(default=0, init=False)
    clean_runs: int = field(default=0, init=False)   # runs that exited 0 within the limits
    steps: int = field(default=0, init=False)
    final_text: str | None = field(default=None, init=False)
    last_output: str | None = field(default=None, init=False)

    async def reset(self, task: Task) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        question, answer = task.spec.get("question"), task.spec.get("answer")
        if not isinstance(question, str) or not question.strip() or not isinstance(answer, (int, float)):
            raise EnvError(f"task {task.task_id}: a tool-call task needs a 'question' (text) and a numeric "
                           f"'answer', got {sorted(task.spec)}")
        self.task, self.runs, self.clean_runs, self.steps = task, 0, 0, 0
        self.final_text, self.last_output = None, None
        self.sandbox = Sandbox(self.limits, allow_weaker=self.allow_weak_sandbox)
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}], [PYTHON_TOOL]

    async def step(self, assistant: dict[str, Any]) -> StepResult:
        if self.task is None:
            raise EnvError("step() before reset()")
        self.steps += 1
        calls = [(c.get("id"), _code_of(c)) for c in assistant.get("tool_calls") or []
                 if (c.get("function") or {}).get("name") == "python"]
        blocks = [] if calls else _CODE_BLOCK.findall(assistant.get("content") or "")
        if not calls and not blocks:
            self.final_text = assistant.get("content") or ""
            return StepResult([], [], True, {"ended": "answered"})
        observations, messages = [], []
        for call_id, code in calls or [(None, blocks[0])]:
            ran = await self.sandbox.run_python(code or "")
            self.runs += 1
            text = (ran.stdout + (("\n" if ran.stdout else "") + ran.stderr if ran.stderr else "")).strip()
            if not ran.ok:
                text = f"{text}\n[{ran.describe()}]".strip()
            else:
                self.clean_runs += 1
                if ran.stdout.strip():
                    self.last_output = ran.stdout
            # a run we killed has no exit code of its own: say 124 (timeout) or 137 (output cap),
            # as shells do, so the step judge counts it as the failure it is
            code = ran.exit_code if ran.exit_code is not None else (124 if ran.timed_out else 137)
            observations.append(Observation(FeedbackKind.TOOL_OUTPUT, text, exit_code=code))
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text} if call_id
                            else {"role": "user", "content": f"Output:\n{text}"})
        done = self.steps >= self.max_steps
        return StepResult(observations, messages, done, {"ended": "step_limit"} if done else {})

    async def evaluate(self) -> Outcome:
        if self.task is None:
            raise EnvError("evaluate() before reset()")
        want = self.task.spec["answer"]
        got = final_answer(self.final_text) if self.final_text else None
        source = "text"
        if got is None and self.last_output:
            got, source = final_answer(self.last_output), "last output"
        correct = verify(got, want)
        value = toolcall_outcome(correct, self.runs, self.shaped_outcome)
        return Outcome(value, "numeric", "1", {"expected": want, "got": got, "from": source, "tool_runs": self.runs,
                        "clean_runs": self.clean_runs},
                       correct)

    async def close(self) -> None:
        self.task = None


def _code_of(call: dict[str, Any]) -> str:
    args = (call.get("function") or {}).get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return args   # a bare program instead of JSON: run it as it is
    return str((args or {}).get("code", "")) if isinstance(args, dict) else ""
