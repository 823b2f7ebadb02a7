"""`nextstate bench hints` on the tiny model: every wording of every preference's correction is
measured in each placement, the rates are shares of the probes, and bad names are refused."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from infra.cli.bench_hints import bins_entropy, run_hints_bench
from infra.errors import ConfigError
from infra.settings import ServingSettings, Settings
from producers.simulated.personas import PERSONAS, split_questions


def test_each_placement_and_wording_is_measured_on_the_probes(tiny_model_dir, tmp_path):
    settings = Settings(serving=ServingSettings(model=str(tiny_model_dir)))
    console = Console(record=True, width=160)
    rows = run_hints_bench(settings, ["brief", "formal"], ["before", "after"], tmp_path / "hints.json", console)
    probes = len(split_questions()[1])
    assert [r["preference"] for r in rows] == ["brief", "formal"]
    for row in rows:
        for placement in ("before", "after"):
            rates = row["placements"][placement]["per_wording"]
            assert len(rates) == len(PERSONAS[row["preference"]].corrections)
            assert all(0 <= r <= 1 and (r * probes).is_integer() for r in rates)
            assert row["placements"][placement]["mean"] == pytest.approx(sum(rates) / len(rates))
        assert 0 <= row["base"] <= 1
        # how sure the base is, and the teacher with each placement, on the 16 + 1 bins
        for spread in [row["entropy"]] + [row["placements"][p]["entropy"] for p in ("before", "after")]:
            assert set(spread) == {"first", "later"}
            assert all(0 < h <= math.log(17) + 1e-9 for h in spread.values())
    assert json.loads((tmp_path / "hints.json").read_text()) == rows
    printed = console.export_text()
    assert "hint before" in printed and "hint after" in printed
    assert "first token / later tokens" in printed


def test_bins_entropy_counts_the_rest_of_the_vocabulary_as_one_bin():
    assert bins_entropy([math.log(0.25)] * 4) == pytest.approx(math.log(4))
    assert bins_entropy([math.log(0.5)]) == pytest.approx(math.log(2))        # 0.5 and a rest of 0.5
    assert bins_entropy([0.0]) == 0.0


def test_unknown_names_are_refused_before_a_model_loads(tmp_path):
    settings = Settings(serving=ServingSettings(model=str(tmp_path / "no-model-here")))
    with pytest.raises(ConfigError, match="'middle'"):
        run_hints_bench(settings, ["brief"], ["middle"], None, Console())
    with pytest.raises(ConfigError, match="'shouting'"):
        run_hints_bench(settings, ["shouting"], ["before"], None, Console())
