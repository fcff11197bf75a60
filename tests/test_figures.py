"""`python -m smf_lib.figures`: figures redrawn from the result files that exist, the others skipped by name."""

import json

from smf_lib.figures import make_figures

VARIANT = {"paraphrase_recall": 0.3, "known_fact_drop_pct": 4.4, "answer_bleed_pct": 20.0,
           "at_matched_recall": {"recall": 0.9}}
STREAM = {"profile": "cpu", "rounds": 2, "facts_per_round": 3,
          "methods": {"smf_kl": {"retention": [[0.9], [0.8, 1.0]], "known_fact_drop_pct": [1.0, 2.0]}}}


def test_figures_are_drawn_from_existing_results_and_missing_ones_named(tmp_path):
    results, out = tmp_path / "results", tmp_path / "figures"
    (results / "ablation" / "cpu").mkdir(parents=True)
    for name, reached in (("base", True), ("slow", False)):
        variant = {**VARIANT, "at_matched_recall": VARIANT["at_matched_recall"] if reached else None}
        (results / "ablation" / "cpu" / f"{name}.json").write_text(json.dumps(variant))
    (results / "stream-cpu").mkdir()
    (results / "stream-cpu" / "summary.json").write_text(json.dumps(STREAM))
    made = make_figures("cpu", results, out)
    assert sorted(p.name for p in out.iterdir()) == ["ablations-cpu.png", "stream-cpu.png"]
    assert all(p.stat().st_size > 10_000 for p in out.iterdir())
    assert made["pareto-cpu.png"].startswith("skipped: no ") and "python -m smf_lib run --profile cpu" in made[
        "pareto-cpu.png"]


def test_nothing_measured_draws_nothing(tmp_path):
    made = make_figures("cpu", tmp_path / "results", tmp_path / "figures")
    assert all(m.startswith("skipped") for m in made.values()) and not (tmp_path / "figures").exists()
