"""`bench personal`'s report names every run as given: an ablation's `opd[epochs=1]` is a name,
not rich markup (it was swallowed, and two runs both printed as `opd`)."""

from __future__ import annotations

import json

from rich.console import Console

from infra.cli.bench_personal import PersonalBenchConfig, PreferenceResult, Probe, Variant, report


def test_ablation_names_survive_the_report(tmp_path):
    variants = (Variant.parse("opd"), Variant.parse("opd:epochs=1"))
    cfg = PersonalBenchConfig(preferences=("formal",), variants=variants, out_dir=tmp_path)
    answers = ["It is a fine day for a walk by the sea.", "Water boils at one hundred degrees."]
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
