"""Settings: sections from the environment, secrets masked, secrets required off the local stack."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from infra.errors import ConfigError
from infra.settings import Profile, load_settings, masked


def test_nested_environment_overrides(monkeypatch):
    monkeypatch.setenv("NEXTSTATE_KAFKA__BOOTSTRAP_SERVERS", "10.0.0.5:9092")
    monkeypatch.setenv("NEXTSTATE_LEARNER__LR", "3e-6")
    s = load_settings()
    assert s.kafka.bootstrap_servers == "10.0.0.5:9092"
    assert s.learner.lr == 3e-6
    assert s.kafka.topic("samples") == "nextstate.samples"
    assert s.kafka.topic("samples", "replay-1.") == "replay-1.samples"


def test_settings_are_frozen():
    s = load_settings()
    with pytest.raises(Exception):
        s.kafka = None  # type: ignore[misc]
    with pytest.raises(Exception):
        s.kafka.partitions = 9  # type: ignore[misc]


def test_local_profile_fills_stack_credentials_and_masks_them():
    s = load_settings()
    assert s.profile is Profile.LOCAL
    assert s.storage.secret_key is not None
    shown = json.dumps(masked(s))
    assert s.storage.secret_key.get_secret_value() not in shown
    assert "**********" in shown


def test_production_requires_every_secret(monkeypatch):
    monkeypatch.setenv("NEXTSTATE_PROFILE", "production")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "storage.access_key" in str(err.value) and "gateway.api_keys" in str(err.value)
    monkeypatch.setenv("NEXTSTATE_STORAGE__ACCESS_KEY", "prod-user")
    monkeypatch.setenv("NEXTSTATE_STORAGE__SECRET_KEY", "prod-secret-123")
    monkeypatch.setenv("NEXTSTATE_GATEWAY__API_KEYS", '{"acme": "k-very-secret"}')
    s = load_settings()
    assert s.storage.secret_key.get_secret_value() == "prod-secret-123"
    assert "k-very-secret" not in json.dumps(masked(s))


def test_invalid_value_names_the_field(monkeypatch):
    monkeypatch.setenv("NEXTSTATE_KAFKA__PARTITIONS", "0")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "partitions" in str(err.value)


def test_config_show_masks_secrets(monkeypatch):
    from infra.cli import app

    monkeypatch.setenv("NEXTSTATE_STORAGE__SECRET_KEY", "super-secret-value")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "super-secret-value" not in result.output
    assert '"bootstrap_servers"' in result.output


def test_config_show_says_what_the_device_decides(monkeypatch):
    from infra.cli import app
    from infra.settings import FULL_LR, LORA_LR

    monkeypatch.setenv("NEXTSTATE_LEARNER__DEVICE", "cpu")
    monkeypatch.delenv("NEXTSTATE_PROCESSORS__TEACHER_MODEL", raising=False)
    out = " ".join(CliRunner().invoke(app, ["config", "show"]).output.split())
    assert f"trains on cpu with LoRA (rank 16) at lr {LORA_LR:g} (the default for that)" in out
    assert "teacher is the served base model" in out
    assert "greedy answers to 4 of each step's contexts and 4 earlier ones are checked for loops" in out
    assert "each looping answer began with" not in out
    assert "repaired by up to" not in out
    assert "rewards against the last 64 rewards of any step" in out
    monkeypatch.setenv("NEXTSTATE_LEARNER__LOOP_GUARD__FIRST", "1")
    out = " ".join(CliRunner().invoke(app, ["config", "show"]).output.split())
    assert "repeats pushed down × 1, with the first 1 token(s) each looping answer began with" in out
    monkeypatch.delenv("NEXTSTATE_LEARNER__LOOP_GUARD__FIRST")
    monkeypatch.setenv("NEXTSTATE_LEARNER__LOOP_GUARD__AFTER", "2")
    out = " ".join(CliRunner().invoke(app, ["config", "show"]).output.split())
    assert "the updated weights are checked on the same contexts and repaired by up to 2 more pass(es)" in out
    monkeypatch.delenv("NEXTSTATE_LEARNER__LOOP_GUARD__AFTER")
    assert "approved answers again" not in out
    monkeypatch.setenv("NEXTSTATE_LEARNER__APPROVED__REPLAY", "4")
    out = " ".join(CliRunner().invoke(app, ["config", "show"]).output.split())
    assert "each step trains up to 4 of the newest 32 approved answers again (advantage 1)" in out
    monkeypatch.delenv("NEXTSTATE_LEARNER__APPROVED__REPLAY")
    assert "the teacher also answers" not in out
    monkeypatch.setenv("NEXTSTATE_PROCESSORS__TEACHER_ANSWERS", "true")
    out = " ".join(CliRunner().invoke(app, ["config", "show"]).output.split())
    assert "the teacher also answers each hinted turn itself, trained in the student's context at advantage 1 (teacher answers)" in out
    monkeypatch.setenv("NEXTSTATE_LEARNER__TEACHER_ANSWER_CREDIT", "gap")
    out = " ".join(CliRunner().invoke(app, ["config", "show"]).output.split())
    assert "advantage 1 (teacher answers), each token times the teacher's logprob lead over the policy" in out
    assert "halved every" not in out
    monkeypatch.setenv("NEXTSTATE_LEARNER__TEACHER_ANSWERS_HALFLIFE", "8")
    out = " ".join(CliRunner().invoke(app, ["config", "show"]).output.split())
    assert "over the policy (teacher_answer_credit gap), halved every 8 answers trained (teacher_answers_halflife)" in out
    monkeypatch.setenv("NEXTSTATE_LEARNER__TEACHER_ANSWERS", "0")
    out = " ".join(CliRunner().invoke(app, ["config", "show"]).output.split())
    assert "the teacher also answers each hinted turn itself, not trained here (learner.teacher_answers)" in out
    for name in ("PROCESSORS__TEACHER_ANSWERS", "LEARNER__TEACHER_ANSWER_CREDIT", "LEARNER__TEACHER_ANSWERS",
                 "LEARNER__TEACHER_ANSWERS_HALFLIFE"):
        monkeypatch.delenv("NEXTSTATE_" + name)
    monkeypatch.setenv("NEXTSTATE_LEARNER__LOOP_GUARD__PROMPTS", "0")
    monkeypatch.setenv("NEXTSTATE_LEARNER__ADV_NORM", "batch")
    out = " ".join(CliRunner().invoke(app, ["config", "show"]).output.split())
    assert "greedy answers are not checked for loops" in out
    assert "rewards against the step's mean and spread" in out
    assert "no flatter than the base" not in out
    monkeypatch.setenv("NEXTSTATE_LEARNER__LOSS__FLAT_COEF", "0.5")
    out = " ".join(CliRunner().invoke(app, ["config", "show"]).output.split())
    assert "no flatter than the base × 0.5 (its next-token entropy at most 0 nats above the base's)" in out
    monkeypatch.delenv("NEXTSTATE_LEARNER__LOSS__FLAT_COEF")
    monkeypatch.delenv("NEXTSTATE_LEARNER__ADV_NORM")
    monkeypatch.delenv("NEXTSTATE_LEARNER__LOOP_GUARD__PROMPTS")
    s = load_settings()
    assert s.learner.learning_rate("cpu") == LORA_LR and s.learner.learning_rate("cuda") == FULL_LR
    monkeypatch.setenv("NEXTSTATE_LEARNER__LR", "3e-6")
    monkeypatch.setenv("NEXTSTATE_LEARNER__LORA", "false")
    assert load_settings().learner.learning_rate("cpu") == 3e-6 and not load_settings().learner.uses_lora("cpu")


def test_client_addresses_follow_the_local_stack_ports(monkeypatch):
    monkeypatch.setenv("NEXTSTATE_STACK__KAFKA_PORT", "19092")
    monkeypatch.setenv("NEXTSTATE_STACK__REGISTRY_PORT", "18081")
    monkeypatch.setenv("NEXTSTATE_STACK__MINIO_PORT", "19000")
    s = load_settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert s.registry.url == "http://127.0.0.1:18081/apis/ccompat/v7"
    assert s.storage.endpoint == "127.0.0.1:19000"
    # An address given explicitly wins over the derived one.
    monkeypatch.setenv("NEXTSTATE_KAFKA__BOOTSTRAP_SERVERS", "broker.internal:9092")
    assert load_settings().kafka.bootstrap_servers == "broker.internal:9092"


@pytest.mark.parametrize("env,value,allowed", [
    ("NEXTSTATE_SERVING__ENGINE", "vllm", ["local", "remote", "sglang"]),
    ("NEXTSTATE_PROCESSORS__JUDGE", "gpt", ["feedback", "llm"]),
    ("NEXTSTATE_PROCESSORS__HINT_SELECTION", "shortest", ["LONGEST", "OVERLAP_SEQUENCE", "OVERLAP_TOKEN"]),
    ("NEXTSTATE_PROCESSORS__TEACHER_POLICY", "latest", ["base", "current"]),
    ("NEXTSTATE_LEARNER__METHOD", "ppo", ["RL", "OPD", "COMBINED"]),
    ("NEXTSTATE_LEARNER__STALENESS_POLICY", "ignore", ["drop", "correct"]),
    ("NEXTSTATE_LEARNER__ADV_NORM", "global", ["none", "group", "step", "batch"]),
    ("NEXTSTATE_LEARNER__LR_SCHEDULE", "step", ["constant", "cosine", "linear"]),
])
def test_config_show_refuses_a_closed_choice_outside_its_values_and_lists_them(monkeypatch, env, value, allowed):
    from infra.cli import app

    monkeypatch.setenv(env, value)
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert value.lower() in out.lower() and all(a in out for a in allowed), out


def test_closed_choices_are_case_insensitive_and_loss_settings_are_one_section(monkeypatch):
    from schemas.events import HintSelection, Method

    monkeypatch.setenv("NEXTSTATE_LEARNER__METHOD", "opd")
    monkeypatch.setenv("NEXTSTATE_PROCESSORS__HINT_SELECTION", "overlap_token")
    monkeypatch.setenv("NEXTSTATE_LEARNER__LOSS__W_OPD", "0.5")
    s = load_settings()
    assert s.learner.method is Method.OPD and s.processors.hint_selection is HintSelection.OVERLAP_TOKEN
    assert s.learner.loss.w_opd == 0.5 and s.learner.loss.clip_low == 0.2


def test_the_settings_choices_match_the_registries_that_own_them():
    from typing import get_args

    from infra import settings as st
    from learner.staleness import POLICIES
    from learner.trainer import ANSWER_CREDITS, LR_SCHEDULES
    from processors.judges import HINT_JUDGES, REWARD_JUDGES
    from serving.chat import PLACEMENTS
    from serving.registry import ENGINE_MODULES

    assert set(get_args(st.EngineName)) == set(ENGINE_MODULES)
    assert set(get_args(st.JudgeName)) == set(REWARD_JUDGES) == set(HINT_JUDGES)
    assert set(get_args(st.StalenessPolicy)) == set(POLICIES)
    assert set(get_args(st.LrSchedule)) == set(LR_SCHEDULES)
    assert set(get_args(st.HintPlacement)) == set(PLACEMENTS)
    assert set(get_args(st.AnswerCredit)) == set(ANSWER_CREDITS)


def test_an_invalid_secret_is_named_but_never_echoed(monkeypatch):
    monkeypatch.setenv("NEXTSTATE_GATEWAY__API_KEYS", '{"acme": ["sk-do-not-print-me"]}')
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "gateway.api_keys" in str(err.value) and "sk-do-not-print-me" not in str(err.value)
