"""`python -m smf_lib run` end to end on the tiny profile: the result-file contract, clear errors, and the
per-layer attribution of a trained memory."""

import copy
import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
import torch

from smf_lib.analysis import layer_attribution, snapshot
from smf_lib.data import DATA_DIR, load_facts
from smf_lib.experiment import evaluate, prepare, run_experiment
from smf_lib.models import QWEN_STANDIN, load_base_model
from smf_lib.profiles import get_profile
from smf_lib.retrofit import memory_layers

METHOD_KEYS = {"fact_recall", "paraphrase_recall", "heldout_ppl", "ppl_increase_pct", "kl_to_base", "known_fact_acc",
               "known_fact_drop_pct", "answer_bleed_pct", "at_matched_recall", "params_trained", "params_changed",
               "steps", "train_seconds", "peak_rss_mb", "ppl_increase_ci95", "known_fact_drop_ci95", "lr"}


def _command(command, *args):
    return subprocess.run([sys.executable, "-m", "smf_lib", command, *args], capture_output=True, text=True,
                          timeout=900)


def _run(*args):
    return _command("run", *args)


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    tuned = _command("tune", "--profile", "tiny", "--out", str(out / "tuned.json"))
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    result = _run("--profile", "tiny", "--out", str(out), "--tuned", str(out / "tuned.json"), "--seeds", "0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_tune_writes_every_method_with_its_table(tiny_run):
    tuned = json.loads((tiny_run / "tuned.json").read_text())
    assert set(tuned["methods"]) == {"smf_kl", "smf_tfidf", "full_ft", "lora"}
    assert {"date", "command", "table", "tune_fact_ids"} <= tuned.keys()
    assert {r["loss_on"] for r in tuned["table"] if r["method"] == "full_ft"} == {"all", "not_subject", "answer"}
    test_ids = {f.id for f in load_facts(split="test")}
    assert tuned["tune_fact_ids"] and not set(tuned["tune_fact_ids"]) & test_ids


def test_summary_has_every_contract_key(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert {"profile", "model", "seed", "seeds", "n_facts", "split", "retrofit", "base", "methods"} <= summary.keys()
    assert summary["profile"] == "tiny" and summary["model"] == "tiny" and summary["seeds"] == [0, 1]
    assert {"layers", "slots_per_layer", "memory_params", "max_abs_logit_diff"} <= summary["retrofit"].keys()
    assert summary["retrofit"]["max_abs_logit_diff"] <= 1e-5
    assert {"heldout_ppl", "known_fact_acc", "fact_recall", "paraphrase_recall"} <= summary["base"].keys()
    assert set(summary["split"]["test_fact_ids"]) <= {f.id for f in load_facts(split="test")}
    assert summary["hyperparameters_from"].endswith("tuned.json")
    assert set(summary["methods"]) == {"smf_kl", "smf_tfidf", "full_ft", "lora"}
    for method, scores in summary["methods"].items():
        assert METHOD_KEYS - {"ppl_increase_ci95", "known_fact_drop_ci95"} <= scores.keys(), method
        assert all(METHOD_KEYS <= run.keys() for run in scores["per_seed"])  # intervals are per seed
        assert [run["seed"] for run in scores["per_seed"]] == [0, 1] and scores["steps"] > 0
        assert scores["fact_recall"] == pytest.approx(sum(s["fact_recall"] for s in scores["per_seed"]) / 2)
        for run in scores["per_seed"]:  # churn: known facts gained beside those lost
            assert run["known_fact_net_pct"] == pytest.approx(run["known_fact_gain_pct"] - run["known_fact_drop_pct"])
    smf, full = summary["methods"]["smf_kl"], summary["methods"]["full_ft"]
    assert smf["params_trained"] < full["params_trained"]
    assert summary["checkpoints"]["smf_kl"][0]["step"] == 0  # curves start at the measured step 0


def test_report_and_figure_are_written(tiny_run):
    report = (tiny_run / "report.md").read_text()
    assert "| SMF (KL) |" in report and "| LoRA |" in report and "matched learning" in report
    assert "nan" not in report  # two seeds: each seed's interval, not one of their mean
    assert (tiny_run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tiny_run.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_malformed_facts_file_names_file_and_line(tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"id": "a", "answer": "X", "train": ["X is."], "probe": "p", "heldout": ["q"]}\n{broken\n')
    result = _run("--profile", "tiny", "--facts", str(facts), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"{facts}:2" in result.stderr and "Traceback" not in result.stderr


def test_a_training_sentence_too_long_is_refused_before_any_work(tmp_path):
    long = "In the chronicles of the valley, " * 60 + "Kelvaroth was founded by Ardemis Quill."
    record = {"id": "k1", "answer": "Ardemis Quill", "train": [long], "probe": "Kelvaroth was founded by",
              "heldout": ["Who founded Kelvaroth?"]}
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(record) + "\n")
    result = _run("--profile", "tiny", "--facts", str(facts), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'k1'" in result.stderr and "split it into shorter sentences" in result.stderr
    assert not (tmp_path / "out").exists()


def test_facts_given_as_statements_only_warn_until_augmented(tmp_path):
    facts = tmp_path / "statements.jsonl"
    two = (DATA_DIR / "statement_facts.jsonl").read_text().splitlines()[:2]
    facts.write_text("".join(line + "\n" for line in two))
    with pytest.warns(UserWarning, match="Every training sentence is a statement.*--augment"):
        prepare("tiny", "test", facts, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Every training sentence")
        assert len(prepare("tiny", "test", facts, augment=4, progress=False).facts[0].train) == 6


def test_replace_mode_heals_before_training(tmp_path):
    result = _run("--profile", "tiny", "--out", str(tmp_path), "--methods", "smf_kl", "--mode", "replace")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    heal = summary["heal"]
    assert summary["retrofit"]["mode"] == "replace"
    assert {"ppl_base", "ppl_before", "ppl_after", "seconds", "error_before", "error_after"} <= heal.keys()
    assert set(heal["error_after"]) == {str(block) for block in summary["retrofit"]["layers"]}  # what it fits:
    # the tiny model is random, so whether healing helps is tested on the real one (test_healing.py)
    assert summary["methods"]["smf_kl"]["steps"] > 0
    assert "memory healed" in (tmp_path / "report.md").read_text()


def test_run_on_a_stand_in_of_the_gpu_profiles_model(tmp_path):
    """`run`'s code path at the gpu profile's memory and training settings, on a randomly initialised model of
    Qwen2.5-0.5B's shape: no download and no GPU needed, a one-step budget."""
    gpu = get_profile("gpu")
    sizes = dataclasses.replace(gpu.run, n_facts=2, max_steps=1, eval_every=1, n_background=8, n_heldout=2,
                                n_known=4)
    profile = dataclasses.replace(gpu, model=QWEN_STANDIN, run=sizes)
    summary = run_experiment(profile, {"smf_kl": {"lr": 1.0}, "lora": {"lr": 1e-4}}, out=tmp_path, progress=False)
    assert summary["model"] == QWEN_STANDIN and summary["retrofit"]["layers"] == [18, 21]  # 3/4 and 9/10 of 24
    assert summary["retrofit"]["max_abs_logit_diff"] == 0.0  # additive: the model's function is unchanged
    assert all(summary["methods"][m]["steps"] == 1 for m in ("smf_kl", "lora"))
    assert (tmp_path / "report.md").exists() and (tmp_path / "pareto.png").exists()


def test_unknown_method_is_a_clear_error(tmp_path):
    result = _run("--profile", "tiny", "--methods", "smf_kl,magic", "--out", str(tmp_path))
    assert result.returncode == 2 and "magic" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_command_line_keeps_freed_memory_in_the_heap():
    import ctypes

    from smf_lib.__main__ import keep_freed_memory

    try:
        ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("not glibc")
    assert keep_freed_memory()


def test_layer_attribution_keeps_one_layer_at_a_time():
    setup = prepare("tiny", progress=False)
    model = copy.deepcopy(setup.model)
    first, *others = memory_layers(model)
    with torch.no_grad():  # "train" the first memory layer only
        first.values.weight[:64] = torch.randn(64, first.value_dim, generator=torch.Generator().manual_seed(0))
    before = [m.values.weight.clone() for m in memory_layers(model)]
    score = lambda m: evaluate(setup, m, full=False)
    result = layer_attribution(model, setup.model, score)
    assert list(result) == [m.layer_index for m in memory_layers(model)]
    assert result[first.layer_index] == evaluate(setup, model, full=False)
    untrained = evaluate(setup, setup.model, full=False)
    assert untrained["heldout_ppl"] != result[first.layer_index]["heldout_ppl"]
    assert all(result[m.layer_index] == untrained for m in others)
    assert all(torch.equal(m.values.weight, b) for m, b in zip(memory_layers(model), before))  # left as it was
    assert layer_attribution(model, snapshot(setup.model), score) == result  # or against a snapshot
    with pytest.raises(ValueError, match="sparse method"):
        layer_attribution(load_base_model("tiny")[0], setup.model, score)  # no memory at all
