"""`bench personal`'s report: every run named as given (an ablation's `opd[epochs=1]` is a name,
not rich markup: it was swallowed, and two runs both printed as `opd`), each run held to the
goals, and a saved run reported again from its results.json."""

from __future__ import annotations

import json
import signal

import pytest
from rich.console import Console

from infra.cli.bench_personal import (Goals, PersonalBenchConfig, PreferenceResult, Probe, Variant, check_goals,
                                      load_results, report)
from infra.errors import ConfigError


def test_ablation_names_survive_the_report(tmp_path):
    variants = (Variant.parse("opd"), Variant.parse("opd:epochs=1"))
    cfg = PersonalBenchConfig(preferences=("formal",), variants=variants, out_dir=tmp_path)
    answers = [f"It is a fine day for walk number {i} by the sea." for i in range(16)]
    result = PreferenceResult("formal", Probe("base", 0, 0, 0.31, answers, sampled_rate=0.38),
                              Probe("base+hint", 0, 0, 0.81, answers, sampled_rate=0.52), sessions=12)
    result.probes = [Probe("opd", 12, 2, 0.81, answers, sampled_rate=0.62),
                     Probe("opd[epochs=1]", 12, 2, 0.44, answers, sampled_rate=0.48, sampled_looping=0.0625)]
    console = Console(record=True, width=200)
    report(cfg, [result], tmp_path, console, 60.0)
    shown = console.export_text()
    assert "opd[epochs=1]" in shown and "0.44 (v2)" in shown and "0.81 (v2)" in shown
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "opd[epochs=1]" in json.dumps(saved)
    # the share of sampled answers that loop: shown for the last round, kept for every probe
    assert "0.06" in shown and "looping sampled" in shown
    probes = {p["variant"]: p for p in saved["preferences"][0]["probes"]}
    assert probes["opd[epochs=1]"]["sampled_looping"] == 0.0625 and probes["opd"]["sampled_looping"] is None


def _result(preference: str, base_rate: float, hinted_rate: float, curves: dict[str, list[float]],
            logprobs: dict[str, float] | None = None, loop_at: tuple[str, int] | None = None) -> PreferenceResult:
    """Probes after 12, 24, 36, 48 interactions with the given greedy rates; distinct answers
    unless `loop_at` = (run, round) makes one of that probe's answers loop."""
    answers = [f"Answer number {i} says something about topic {i * 7}." for i in range(16)]
    result = PreferenceResult(preference, Probe("base", 0, 0, base_rate, answers, base_logprob=-0.80),
                              Probe("base+hint", 0, 0, hinted_rate, answers, base_logprob=-0.90), sessions=48)
    for name, rates in curves.items():
        for i, rate in enumerate(rates):
            mine = list(answers)
            if loop_at == (name, 12 * (i + 1)):
                mine[0] = "It is so. " * 4
            last = i == len(rates) - 1
            result.probes.append(Probe(name, 12 * (i + 1), i + 1, rate, mine,
                                       base_logprob=(logprobs or {}).get(name) if last else None))
    return result


def test_goals_of_a_learnable_preference():
    curves = {"combined": [0.50, 0.81, 0.88, 0.94], "rl": [0.25, 0.81, 0.94, 0.88], "opd": [0.69, 0.62, 0.56, 0.50]}
    result = _result("formal", 0.31, 0.81, curves, {"combined": -1.10, "rl": -1.40, "opd": -0.85},
                     loop_at=("rl", 24))
    rows = {row["variant"]: row for row in check_goals(result, list(curves), Goals())}
    combined, rl, opd = rows["combined"], rows["rl"], rows["opd"]
    # 0.8 first at 24 and 0.94 after 48; behind opd at 12 and behind rl at 36: 2 of 4 rounds
    assert combined["reached"] == 24 and combined["learned"] and combined["kept"]
    assert combined["vs_parts"] == [2, 4] and combined["vs_parts_ok"] is False
    assert abs(combined["logprob_drop"] - (-0.30)) < 1e-9 and combined["logprob_ok"] and combined["loops_ok"]
    assert combined["met"] is False
    # rl: learned and kept, but one answer looped at 24 and its answers fell 0.6 below the base's
    assert rl["learned"] and rl["kept"] and rl["looping"] == [0, 1, 0, 0] and rl["loops_ok"] is False
    assert rl["logprob_ok"] is False and rl["vs_parts"] is None and rl["met"] is False
    # opd never reached 0.8
    assert opd["reached"] is None and opd["learned"] is False and opd["kept"] is False
    # combined ahead in every round, everything else in bounds: met
    curves["combined"] = [0.69, 0.81, 0.94, 0.94]
    result = _result("formal", 0.31, 0.81, curves, {"combined": -1.10, "rl": -1.40, "opd": -0.85})
    assert check_goals(result, list(curves), Goals())[0]["met"] is True
    # the same run, not scored by the base model: not met (the logprob part is unknown)
    result = _result("formal", 0.31, 0.81, curves)
    row = check_goals(result, list(curves), Goals())[0]
    assert row["logprob_ok"] is None and row["met"] is False


def test_goals_where_the_hinted_base_cannot_follow_the_preference():
    curves = {"combined": [0.06, 0.12, 0.19, 0.25], "combined[lr=1e-3]": [0.0, 0.0, 0.06, 0.0]}
    result = _result("lowercase", 0.0, 0.12, curves, {"combined": -0.9, "combined[lr=1e-3]": -0.9})
    rows = check_goals(result, list(curves), Goals())
    # not asked to reach 0.8; above the base after the last round is the bar
    assert rows[0]["learned"] is None and rows[0]["kept"] is True and rows[0]["met"] is True
    assert rows[1]["kept"] is False and rows[1]["met"] is False
    # no plain rl / opd run: nothing to compare with
    assert rows[0]["vs_parts"] is None


def test_a_saved_run_reports_again_with_its_goals(tmp_path):
    curves = {"combined": [0.50, 0.81, 0.88, 0.94], "rl": [0.25, 0.75, 0.81, 0.88], "opd": [0.44, 0.62, 0.56, 0.50]}
    cfg = PersonalBenchConfig(preferences=("formal",), variants=tuple(Variant.parse(v) for v in curves),
                              out_dir=tmp_path, model="some/model")
    result = _result("formal", 0.31, 0.81, curves, {"combined": -1.0, "rl": -1.0, "opd": -1.0})
    report(cfg, [result], tmp_path, Console(record=True, width=240), 90.0)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["preferences"][0]["goals"][0]["vs_parts"] == [4, 4]
    cfg2, results, elapsed = load_results(tmp_path / "results.json")
    assert [v.name for v in cfg2.variants] == list(curves) and cfg2.model == "some/model" and elapsed == 90.0
    assert results[0].probes == result.probes and results[0].hinted == result.hinted
    console = Console(record=True, width=240)
    report(cfg2, results, tmp_path, console, elapsed)
    shown = console.export_text()
    assert "goals" in shown and "4/4 ✓" in shown and "base+hint" in shown and "-0.10" in shown


def test_a_report_again_says_when_the_answer_rule_now_judges_answers_differently(tmp_path):
    """A run's rates were judged by the users of its day; --report recomputes only the
    non-answer column, and says how many answers the rule now judges otherwise."""
    from infra.cli.bench_personal import rejudged, report_again
    from infra.settings import Settings

    curves = {"combined": [0.50, 0.81, 0.88, 0.94]}
    cfg = PersonalBenchConfig(preferences=("brief",), variants=(Variant.parse("combined"),), out_dir=tmp_path)
    report(cfg, [_result("brief", 0.06, 0.81, curves, {"combined": -1.0})], tmp_path,
           Console(record=True, width=240), 60.0)
    path = tmp_path / "results.json"
    assert rejudged(path) == (0, 5 * 16)   # the base's and four rounds' answers, as judged when saved
    data = json.loads(path.read_text())
    data["preferences"][0]["probes"][1]["unanswered"] += 3 / 16   # as if three had been judged otherwise
    path.write_text(json.dumps(data))
    assert rejudged(path) == (3, 5 * 16)
    console = Console(record=True, width=240)
    report_again(Settings(), path, console)
    assert "3 of its 80 probe answers are judged differently" in console.export_text()
    for probe in [data["preferences"][0]["base"], *data["preferences"][0]["probes"]]:
        del probe["unanswered"]   # a run from before the rule
    path.write_text(json.dumps(data))
    console = Console(record=True, width=240)
    report_again(Settings(), path, console)
    assert "made before personas.answers" in console.export_text()


def test_a_file_that_is_not_a_results_json_is_refused(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"preferences": [{"preference": "formal"}]}')
    with pytest.raises(ConfigError, match="not a results.json"):
        load_results(path)


def test_the_command_line_reaches_the_benchmark_as_given(monkeypatch):
    """What `nextstate bench personal` is told is what the benchmark runs: preferences, variants,
    sizes, and whether the checkpoints stay for later study."""
    from typer.testing import CliRunner

    import infra.cli.bench_personal as bench
    from infra.cli import app

    seen: list[PersonalBenchConfig] = []
    monkeypatch.setattr(signal, "signal", lambda *_: None)   # the command's SIGTERM handler stays out of pytest
    monkeypatch.setattr(bench, "run_personal_bench", lambda settings, cfg, console: seen.append(cfg))
    args = ["bench", "personal", "--preferences", "brief,formal", "--interactions", "24", "--seed", "3",
            "--variant", "combined:loop_guard.after=2", "--variant", "combined", "--probe-samples", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*args, "--keep-checkpoints"])
    assert result.exit_code == 0, result.output
    first, kept = seen
    assert first.preferences == ("brief", "formal") and (first.interactions, first.seed, first.probe_samples) == (24, 3, 0)
    assert [v.name for v in first.variants] == ["combined[loop_guard.after=2]", "combined"]
    assert not first.keep_checkpoints and kept.keep_checkpoints
    result = CliRunner().invoke(app, ["bench", "personal", "--preferences", "nosuch"])
    assert result.exit_code != 0 and "unknown preference" in result.output and not seen[2:]
