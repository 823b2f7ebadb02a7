"""Tasks from files and from the log: bad input is refused with the line or the field named."""

from __future__ import annotations

import json

import pytest

from infra.settings import EnvSettings
from producers.envs.base import EnvError, generate, load_modules
from producers.envs.runner import env_options, issued, task_of
from producers.envs.work import load_tasks


def test_tasks_from_a_jsonl_file_and_the_bad_lines_named(tmp_path):
    good = tmp_path / "tasks.jsonl"
    good.write_text(json.dumps({"task_id": "a", "spec": {"question": "1+1?", "answer": 2}}) + "\n\n"
                    + json.dumps({"task_id": "b", "env": "toolcall", "spec": {"question": "2+2?", "answer": 4},
                                  "seed": 7}) + "\n")
    tasks = load_tasks(good, default_env="toolcall")
    assert [(t.task_id, t.env, t.seed) for t in tasks] == [("a", "toolcall", 0), ("b", "toolcall", 7)]
    for line, says in [("{not json", "not JSON"), ("[1, 2]", "a task is a JSON object"),
                       (json.dumps({"task_id": "c", "spec": "text"}), "'spec' (an object)"),
                       (json.dumps({"task_id": "d", "spec": {}, "seed": "x"}), "'seed' must be an integer")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"task_id": "ok", "spec": {}}) + "\n" + line + "\n")
        with pytest.raises(EnvError, match=r"bad.jsonl:2: .*" + says.replace("(", r"\(").replace(")", r"\)")):
            load_tasks(bad, default_env="toolcall")


def test_a_task_round_trips_through_its_event_and_a_broken_spec_is_named():
    [task] = generate("toolcall", 1, seed=3)
    event = issued(task, "g-1", 4)
    assert event.key == "g-1" and event.spec_sha256 == task.spec_hash()
    assert task_of(event) == task
    with pytest.raises(EnvError, match="spec_json is not JSON"):
        task_of(event.model_copy(update={"spec_json": "{oops"}))
    with pytest.raises(EnvError, match="must be a JSON object"):
        task_of(event.model_copy(update={"spec_json": "[1]"}))


def test_environment_options_and_modules():
    opts = env_options("toolcall", EnvSettings(max_steps=7, shaped_outcome=False))
    assert opts == {"max_steps": 7, "shaped_outcome": False, "allow_weak_sandbox": False}
    with pytest.raises(EnvError, match="no environment named 'nope'"):
        env_options("nope", EnvSettings())
    with pytest.raises(EnvError, match="'no_such_module_here' could not be imported"):
        load_modules(["no_such_module_here"])
    with pytest.raises(EnvError, match="has no task generator"):
        generate("nope", 1)
