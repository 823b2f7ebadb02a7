"""`nextstate bench teacher`: the hinted teacher's logprob gap at the tokens a user objects to,
against every trained token, from a namespace's samples."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from infra.cli.bench_teacher import teacher_gaps
from infra.kafka import EventProducer
from tests.learner.samples import make_sample


def _hinted(i: int, response: list[int], teacher: list[float], tops: list[int] | None = None, mask=None):
    """A sample whose behaviour logprobs are all −1, with the given teacher logprobs and, with
    `tops`, one top-1 teacher id per position."""
    n = len(response)
    return make_sample(i, response_len=n, teacher=True, loss_mask=mask).model_copy(update={
        "response_token_ids": response, "behaviour_logprobs": [-1.0] * n, "teacher_logprobs": teacher,
        "teacher_top_ids": tops, "teacher_top_logprobs": [-0.5] * n if tops else None})


def _decode(ids: list[int]) -> str:
    return {7: "'s", 8: "!"}.get(ids[0], f"w{ids[0]}")


def test_the_gap_at_the_matching_tokens_is_taken_apart_from_every_trained_token():
    samples = [
        # the teacher much less sure of "'s" (−3 against −1), and its top-1 another token there
        _hinted(1, [5, 7, 6], [-1.5, -4.0, -1.0], tops=[5, 9, 6]),
        # "!" as likely to the teacher as to the policy; an untrained "'s" is not counted
        _hinted(2, [8, 7], [-1.0, -9.0], tops=[8, 9], mask=[1, 0]),
        make_sample(3, reward=1.0),   # no teacher: not read
    ]
    used, every, matched = teacher_gaps(samples, _decode, r"^'s$|!")
    assert used == 2
    assert (matched.tokens, matched.mean, matched.median, matched.below) == (2, -1.5, -1.5, 0.5)
    assert (matched.other_top, matched.with_top) == (1, 2)
    assert every.tokens == 4 and every.mean == pytest.approx((-0.5 - 3.0 + 0.0 + 0.0) / 4)
    assert (every.other_top, every.with_top) == (1, 4)
    _, _, none = teacher_gaps(samples, _decode, r"^never$")
    assert none.tokens == 0 and none.mean is None


def test_the_command_reads_a_real_namespace_and_names_what_it_cannot(settings, registry, namespace,
                                                                      tiny_model_dir, monkeypatch):
    from infra.cli import app

    producer = EventProducer(settings.kafka, registry, namespace)
    for i in range(3):
        producer.send(_hinted(i, [40, 41, 42], [-2.0, -1.0, -1.0]), key=f"s{i}")
    producer.flush()
    monkeypatch.setenv("NEXTSTATE_SERVING__MODEL", str(tiny_model_dir))
    monkeypatch.setenv("COLUMNS", "200")
    # the tiny model's tokenizer is byte-level: token 40 is one character of its own
    from transformers import AutoTokenizer

    first = AutoTokenizer.from_pretrained(tiny_model_dir).decode([40])
    result = CliRunner().invoke(app, ["bench", "teacher", "--namespace", namespace,
                                      "--tokens", f"^{re.escape(first)}$"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "│ every trained token │ 9 │ -0.33 │ +0.00 │ 33% │ no top-K rows │" in out
    assert "│ 3 │ -1.00 │ -1.00 │ 100% │" in out
    assert "3 of 3 samples carry teacher logprobs" in out
    bad = CliRunner().invoke(app, ["bench", "teacher", "--namespace", namespace, "--tokens", "("])
    assert bad.exit_code != 0 and "is not a regular expression" in bad.output
    empty = CliRunner().invoke(app, ["bench", "teacher", "--namespace", "nosuchnamespace"])
    assert empty.exit_code != 0 and "no samples in namespace 'nosuchnamespace.'" in empty.output
