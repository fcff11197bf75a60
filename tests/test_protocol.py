"""The evaluation protocol's pieces: matched-recall interpolation, seeds combined, tuning that never sees a test
fact, and the choice rule every method shares."""

import pytest

from smf_lib import experiment, report, tuning
from smf_lib.data import load_facts, load_known_facts
from smf_lib.profiles import REPLACE_LR_GRID, get_profile
from smf_lib.report import at_matched_recall, combine_seeds
from smf_lib.tuning import choose


def _point(step, recall, ppl, drop):
    return {"step": step, "fact_recall": recall, "paraphrase_recall": recall / 2, "ppl_increase_pct": ppl,
            "known_fact_drop_pct": drop, "answer_bleed_pct": 0.0}


def test_matched_recall_interpolates_between_the_checkpoints_around_the_target():
    points = [_point(0, 0.0, 0.0, 0.0), _point(30, 0.5, 1.0, 2.0), _point(40, 0.8, 2.0, 4.0),
              _point(50, 1.0, 4.0, 8.0)]
    matched = at_matched_recall(points, 0.9)
    assert matched["step"] == pytest.approx(45) and matched["ppl_increase_pct"] == pytest.approx(3.0)
    assert matched["known_fact_drop_pct"] == pytest.approx(6.0) and matched["paraphrase_recall"] == pytest.approx(0.45)
    assert at_matched_recall(points[:3], 0.9) is None  # never reached


def test_choice_prefers_reaching_the_target_then_forgetting_least():
    rows = [{"reached": True, "known_fact_drop_pct": 5.0, "ppl_increase_pct": 1.0, "fact_recall": 1.0, "lr": 1},
            {"reached": True, "known_fact_drop_pct": 2.0, "ppl_increase_pct": 9.0, "fact_recall": 0.9, "lr": 2},
            {"reached": False, "known_fact_drop_pct": 0.0, "ppl_increase_pct": 0.0, "fact_recall": 0.5, "lr": 3}]
    assert choose(rows)["lr"] == 2
    assert choose(rows[2:])["lr"] == 3  # none reached: the best recall


def test_seeds_are_averaged_and_kept():
    runs = [{"seed": s, "methods": {"smf_kl": {"fact_recall": r, "at_matched_recall": {"recall": 0.9, "step": st},
                                               "lr": 0.3}}} for s, r, st in [(0, 0.8, 10), (1, 1.0, 20)]]
    combined = combine_seeds(runs)["methods"]["smf_kl"]
    assert combined["fact_recall"] == pytest.approx(0.9) and combined["fact_recall_std"] > 0
    assert combined["at_matched_recall"]["step"] == pytest.approx(15) and len(combined["per_seed"]) == 2
    assert [run["seed"] for run in combined["per_seed"]] == [0, 1] and "seed" not in combined


def test_each_seed_heals_its_own_memory_and_the_summary_keeps_every_one():
    heal = {"steps": 1000, "seconds": 60.0, "ppl_base": 27.0, "ppl_before": 42.0, "known_fact_acc_base": 0.4,
            "known_fact_acc_after": 0.3, "error_after": {"22": 0.1}}
    runs = [{"seed": s, "heal": {**heal, "ppl_after": ppl}, "methods": {}} for s, ppl in [(1, 34.0), (2, 36.0)]]
    combined = combine_seeds(runs)["heal"]
    assert combined["ppl_after"] == pytest.approx(35.0) and combined["error_after"] == {"22": pytest.approx(0.1)}
    assert [(h["seed"], h["ppl_after"]) for h in combined["per_seed"]] == [(1, 34.0), (2, 36.0)]
    assert "healed (1000 steps, 1.0 min, mean of 2 seeds)" in report._heal_lines(combined)[0]


def test_tuning_never_sees_a_test_fact(monkeypatch, tmp_path):
    test = load_facts(split="test")
    test_text = {s for f in test for s in (*f.train, f.probe, *f.heldout, *f.neighbours)}
    test_known = {k.prompt for k in load_known_facts(split="test")}
    seen = []
    real_train, real_complete = experiment.train, experiment.complete
    monkeypatch.setattr(experiment, "train", lambda m, t, facts, *a, **k: seen.extend(facts) or real_train(
        m, t, facts, *a, **k))
    monkeypatch.setattr(experiment, "complete", lambda m, t, prompts, *a, **k: seen.extend(prompts) or real_complete(
        m, t, prompts, *a, **k))
    tuning.tune("tiny", ["smf_kl", "full_ft"], out=tmp_path / "tuned.json", progress=False)
    trained = [s for fact in seen if not isinstance(fact, str) for s in fact.train]
    prompts = [p for p in seen if isinstance(p, str)]
    assert trained and prompts
    assert not test_text & set(trained + prompts) and not test_known & set(prompts)


def test_replace_mode_is_tuned_apart_with_its_own_rates(tmp_path):
    cpu = get_profile("cpu")
    assert {c["lr"] for c in tuning.candidates(cpu, "smf_kl", "replace")} == set(REPLACE_LR_GRID["smf_kl"])
    assert {c["lr"] for c in tuning.candidates(cpu, "smf_kl")} == set(cpu.run.lr_grid["smf_kl"])
    assert tuning.tuned_path(cpu, "replace").name == "tuned-cpu-replace.json"
    assert tuning.tuned_path(cpu).name == "tuned-cpu.json"
    result = tuning.tune("tiny", ["smf_kl"], out=tmp_path / "replace.json", progress=False, mode="replace")
    assert result["mode"] == "replace" and result["command"].endswith("--mode replace")
    hypers, _ = tuning.tuned_settings(get_profile("tiny"), ["smf_kl"], tmp_path / "replace.json", mode="replace")
    assert hypers["smf_kl"]["lr"] == result["methods"]["smf_kl"]["lr"]
    with pytest.raises(ValueError, match="in replace mode, not 'tiny' at 0.9 in additive mode"):
        tuning.tuned_settings(get_profile("tiny"), ["smf_kl"], tmp_path / "replace.json", mode="additive")


def test_a_target_met_before_training_counts_at_step_zero():
    points = [_point(0, 0.95, 0.0, 0.0), _point(30, 1.0, 1.0, 2.0)]
    assert at_matched_recall(points, 0.9)["step"] == 0


def test_matched_figures_average_only_the_seeds_that_reached_the_target():
    reached = {"recall": 0.9, "step": 40.0, "paraphrase_recall": 0.5, "ppl_increase_pct": 1.0,
               "known_fact_drop_pct": 2.0}
    runs = [{"seed": s, "methods": {"lora": {"fact_recall": r, "at_matched_recall": m, "lr": 1e-4,
                                             "ppl_increase_ci95": (0.0, 1.0)}}}
            for s, r, m in [(0, 0.5, None), (1, 0.95, reached)]]
    combined = combine_seeds(runs)["methods"]["lora"]
    assert combined["at_matched_recall"] == reached and combined["seeds_reaching_target"] == 1
    assert not combined["target_reached"] and "ppl_increase_ci95" not in combined


def test_known_answer_loss_change_is_reported_for_lost_and_kept_facts(monkeypatch):
    """The graded score: the mean change of the known answers' loss, and the same over the facts no longer answered
    and over those still answered (a flip at the margin shows as a small change among the lost); and the drop among
    the firmly known facts beside the drop among all."""
    import torch

    from smf_lib.evaluation import TextScores

    texts = TextScores(torch.full((3,), 20.0, dtype=torch.float64), torch.full((3,), 10.0, dtype=torch.float64),
                       torch.zeros(3, dtype=torch.float64))
    setup = experiment.Setup(None, "test", None, None, [], [], [], None,
                             {"known_fact_acc": 0.5, "known_answer_nll": 1.4}, texts, {},
                             base_known_nll=torch.tensor([0.6, 1.5, 1.0, 2.5]))
    now = torch.tensor([1.0, 3.0, 0.5, 2.0])
    monkeypatch.setattr(experiment, "_scores", lambda s, m, full, graded: (
        {"known_answer_nll": float(now.mean()), "known_fact_gain_pct": 25.0}, [True, False, True, False], now, texts,
        []))
    result = experiment.evaluate(setup, model=None)
    assert result["known_fact_drop_pct"] == pytest.approx(50.0)
    assert result["known_nll_increase"] == pytest.approx(1.625 - 1.4)
    assert result["known_nll_increase_lost"] == pytest.approx(0.5)  # (3 - 1.5 + 2 - 2.5) / 2
    assert result["known_nll_increase_kept"] == pytest.approx(-0.05)
    assert result["known_base_nll_lost"] == pytest.approx(2.0)  # how narrowly they were answered before
    assert result["known_base_nll_kept"] == pytest.approx(0.8)
    assert result["known_fact_drop_firm_pct"] == 0.0  # both facts lost were near ties (answer loss above 1 nat)
    assert result["known_fact_net_pct"] == pytest.approx(25.0 - 50.0)  # one gained, two lost, of four answered


def test_known_facts_the_base_model_missed_count_as_gains_when_answered_now(monkeypatch):
    """Any change of the model flips near ties both ways: a full evaluation also completes the known facts the base
    model did not answer and reports those now answered, per fact the base model answers."""
    import torch

    from smf_lib.data import KnownFact
    from smf_lib.evaluation import TextScores

    known = [KnownFact(f"k{i}", f"Known {i} is", "yes") for i in range(4)]
    unknown = [KnownFact(f"u{i}", f"Unknown {i} is", "yes") for i in range(3)]
    now_answered = {"Known 0 is", "Unknown 0 is", "Unknown 2 is"}
    monkeypatch.setattr(experiment, "complete", lambda m, t, prompts: [
        "yes" if p in now_answered else "no" for p in prompts])
    monkeypatch.setattr(experiment, "_known_nll", lambda s, m: torch.zeros(len(s.known)))
    monkeypatch.setattr(experiment, "heldout_scores", lambda *a, **k: TextScores(torch.ones(1), torch.ones(1)))
    setup = experiment.Setup(None, "test", object(), None, [], known, [], None, {}, None, {}, unknown=unknown)
    scores, known_ok, *_ = experiment._scores(setup, object(), full=True)
    assert known_ok == [True, False, False, False]
    assert scores["known_fact_gain_pct"] == pytest.approx(100 * 2 / 4)
    assert "known_fact_gain_pct" not in experiment._scores(setup, object(), full=False)[0]  # checkpoints skip them
