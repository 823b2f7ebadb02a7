"""The tool-call environment on its own (no gateway): tasks from a seed, tool calls and code
blocks run in the sandbox, each run an observation, the answer verified, the outcome shaped."""

from __future__ import annotations

import asyncio

import pytest

from producers.envs.base import EnvError, Task, create_env
from producers.envs.sandbox import probe
from producers.envs.toolcall import final_answer, generate_tasks
from schemas.events import FeedbackKind

needs_namespaces = pytest.mark.skipif(probe() is not None, reason=f"namespaces unavailable: {probe()}")


def test_tasks_come_from_the_seed_with_exact_answers():
    a, b = generate_tasks(6, seed=3), generate_tasks(6, seed=3)
    assert a == b and a != generate_tasks(6, seed=4)
    assert {t.spec["kind"] for t in a} == {"arithmetic", "word"}
    arithmetic = next(t for t in a if t.spec["kind"] == "arithmetic")
    x, _, y, _, z = arithmetic.spec["question"].removeprefix("What is ").rstrip("?").split()
    assert arithmetic.spec["answer"] == int(x) * int(y) + int(z)
    assert len({t.task_id for t in a}) == 6 and all(t.spec_hash() for t in a)


def test_the_answer_is_read_from_the_marker_then_the_last_number():
    assert final_answer("I think 12. Answer: 1,788") == 1788
    assert final_answer("so \\boxed{-4.5}") == -4.5
    assert final_answer("it is 3 then 42") == 42
    assert final_answer("no idea") is None


@needs_namespaces
def test_a_rollout_with_a_tool_call_then_an_answer():
    async def play():
        env = create_env("toolcall")
        task = Task("t1", "toolcall", {"question": "What is 37 * 48 + 12?", "answer": 37 * 48 + 12})
        messages, tools = await env.reset(task)
        assert messages[-1]["content"] == task.spec["question"] and tools[0]["function"]["name"] == "python"
        call = {"id": "call_1", "type": "function",
                "function": {"name": "python", "arguments": '{"code": "print(37 * 48 + 12)"}'}}
        first = await env.step({"role": "assistant", "content": None, "tool_calls": [call]})
        second = await env.step({"role": "assistant", "content": "Answer: 1788"})
        outcome = await env.evaluate()
        await env.close()
        return first, second, outcome

    first, second, outcome = asyncio.run(play())
    [obs] = first.observations
    assert obs.kind is FeedbackKind.TOOL_OUTPUT and obs.text == "1788" and obs.exit_code == 0
    assert first.messages == [{"role": "tool", "tool_call_id": "call_1", "content": "1788"}] and not first.done
    assert second.done and second.info["ended"] == "answered"
    assert outcome.correct and outcome.value == 1.0 and outcome.raw["tool_runs"] == 1


@needs_namespaces
def test_a_code_block_counts_as_a_call_errors_are_observed_and_a_wrong_answer_is_shaped():
    async def play():
        env = create_env("toolcall", max_steps=2)
        await env.reset(Task("t2", "toolcall", {"question": "What is 2 + 2?", "answer": 4}))
        bad = await env.step({"role": "assistant", "content": "```python\nprint(1/0)\n```"})
        good = await env.step({"role": "assistant", "content": "```python\nprint(2 + 3)\n```"})
        return bad, good, await env.evaluate()

    bad, good, outcome = asyncio.run(play())
    assert bad.observations[0].exit_code == 1 and "ZeroDivisionError" in bad.observations[0].text
    assert bad.messages[0]["role"] == "user" and bad.messages[0]["content"].startswith("Output:")
    assert good.done and good.info["ended"] == "step_limit"   # max_steps reached
    # no final text: the last printed output (5) is the answer, and it is wrong
    assert outcome.raw["got"] == 5 and outcome.raw["from"] == "last output" and not outcome.correct
    assert outcome.value == -1.0   # two runs: min(-0.6, -1 + 0.05·0) = -1


def test_a_malformed_task_is_refused_with_what_it_lacks():
    env = create_env("toolcall", allow_weak_sandbox=True)
    with pytest.raises(EnvError, match="needs a 'question'"):
        asyncio.run(env.reset(Task("bad", "toolcall", {"question": "", "answer": "many"})))
    with pytest.raises(EnvError, match="no environment named 'gui'"):
        create_env("gui")
