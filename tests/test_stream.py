"""`python -m smf_lib stream` on the tiny profile: the retention matrix, patch sizes, reverting a round bit for bit,
and clear errors for a bad number of rounds."""

import copy
import json
from dataclasses import replace

import pytest
import torch

from smf_lib.__main__ import main
from smf_lib.data import load_facts
from smf_lib.experiment import evaluate, prepare, train_method
from smf_lib.patches import apply_patch, lock_patch, make_patch, quantize_patch
from smf_lib.retrofit import memory_layers
from smf_lib.stream import (
    ROUND_DROPOUT,
    STREAM_GATES,
    STREAM_LOCALITY,
    RoundDropout,
    revert_round,
    round_recalls,
    run_stream,
    score_rounds,
    split_rounds,
    stream_method,
    train_precision,
)
from smf_lib.stream_report import backward_transfer, format_stream

HYPERS = {"smf_kl": {"lr": 3.0}, "full_ft": {"lr": 1e-2}}  # tiny's rates: no tuning needed here

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    run_stream("tiny", list(HYPERS), rounds=2, out=out, hypers=HYPERS, progress=False, facts_per_round=2)
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def streamed():
    """The setup, its two rounds of facts, and smf_kl taught round after round, every earlier round in."""
    setup = prepare("tiny", "test", progress=False)
    parts = split_rounds(setup.facts, 2)
    return setup, parts, stream_method(setup, parts, "smf_kl", HYPERS["smf_kl"], progress=False, round_dropout=0)


def test_summary_holds_a_lower_triangular_retention_matrix(summary):
    out, s = summary
    assert (s["rounds"], s["facts_per_round"], s["profile"], s["locked_rounds"]) == (2, 2, "tiny", True)
    assert len(s["round_fact_ids"][1]) == 2 and not s["facts_left_out"]  # the split cut to the rounds taught
    assert (s["split"], s["round_dropout"], s["fit_gates"]) == ("test", ROUND_DROPOUT, STREAM_GATES)
    assert s["methods"]["smf_kl"]["hyper"]["locality"] == STREAM_LOCALITY  # beside the fitted gates
    assert "locality" not in s["methods"]["full_ft"]["hyper"]
    assert set(s["methods"]) == set(HYPERS) and (out / "stream.png").stat().st_size > 0
    for entry in s["methods"].values():
        assert [len(row) for row in entry["retention"]] == [1, 2]  # after round j: rounds 0..j
        assert all(0 <= r <= 1 for row in entry["retention"] for r in row)
        assert all(0 <= r <= 1 for r in entry["paraphrase_recall"])
        assert len(entry["known_fact_drop_pct"]) == len(entry["ppl_increase_pct"]) == 2
    rows = format_stream(s).splitlines()[2:]
    assert len(rows) == 2 and all(row.count("|") == 9 for row in rows)


def test_only_sparse_methods_have_patches_smaller_than_the_memory(summary):
    out, s = summary
    sparse = s["methods"]["smf_kl"]
    assert len(sparse["patch_bytes"]) == 2
    assert all(0 < b < s["memory_bytes"] for b in sparse["patch_bytes"])
    assert [p.stat().st_size for p in sorted((out / "patches" / "smf_kl").iterdir())] == sparse["patch_bytes"]
    assert "patch_bytes" not in s["methods"]["full_ft"] and "revert" not in s["methods"]["full_ft"]
    revert = sparse["revert"]
    assert revert["rows_reverted"] + revert["rows_shared_with_later_rounds"] == revert["rows"] > 0
    assert len(revert["recall_after"]) == 2 and all(0 <= r <= 1 for r in revert["recall_after"])


def _tables(model):
    return {m.layer_index: m.values.weight.detach().clone() for m in memory_layers(model)}


def test_revert_restores_the_rounds_rows_and_leaves_the_others(streamed):
    setup, _, stream = streamed
    final, reference = _tables(stream.model), _tables(setup.model)  # setup.model: the model before round 0
    model = copy.deepcopy(stream.model)
    reverted, shared = revert_round(model, stream.patches, 0)
    after = _tables(model)
    assert reverted.n_rows > 0
    for layer, table in after.items():
        rows = reverted.rows[layer]
        assert torch.equal(table[rows], reference[layer][rows])  # bit for bit the rows before round 0
        untouched = torch.ones(len(table), dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(table[untouched], final[layer][untouched])  # round 1's rows and the shared rows stay
        assert torch.isin(shared[layer], stream.patches[1].rows[layer]).all()


def test_locked_rounds_write_disjoint_rows_and_revert_whole(streamed):
    setup, parts, stream = streamed  # rounds are locked by default
    unlocked = stream_method(setup, parts, "smf_kl", HYPERS["smf_kl"], progress=False, lock=False)
    assert sum(len(r) for r in revert_round(copy.deepcopy(unlocked.model), unlocked.patches, 0)[1].values()) > 0
    first, second = stream.patches
    assert all(not torch.isin(second.rows[i], first.rows[i]).any() for i in first.rows)
    reverted, shared = revert_round(copy.deepcopy(stream.model), stream.patches, 0)
    assert reverted.n_rows == first.n_rows and not any(len(r) for r in shared.values())


def test_independent_rounds_train_each_round_on_the_reference_memory(streamed):
    setup, parts, sequential = streamed
    stream = stream_method(setup, parts, "smf_kl", HYPERS["smf_kl"], progress=False, independent=True)
    first, second = stream.patches
    assert all(torch.equal(first.values[i], sequential.patches[0].values[i]) for i in first.rows)  # round 1 alike
    assert any(not torch.equal(second.values[i], sequential.patches[1].values[i]) for i in second.rows)
    alone = lock_patch(copy.deepcopy(setup.model), first)  # round 1's rows kept out, but not in the memory
    run = train_method(replace(setup, facts=list(parts[1]), model=alone), "smf_kl", HYPERS["smf_kl"],
                       eval_every=1, recall_only=True, progress=False)
    expected = quantize_patch(make_patch(run.model, alone))  # patches are int8 by default
    for i, rows in second.rows.items():
        assert torch.equal(rows, expected.rows[i]) and torch.equal(second.values[i], expected.values[i])
    both = apply_patch(apply_patch(copy.deepcopy(setup.model), first), second)
    assert all(torch.equal(t, _tables(stream.model)[i]) for i, t in _tables(both).items())


def test_round_dropout_takes_earlier_rounds_out_at_training_steps_only(streamed):
    setup, parts, sequential = streamed
    model, first = copy.deepcopy(sequential.model), sequential.patches[0]
    reference, final = _tables(setup.model), _tables(sequential.model)
    dropout = RoundDropout([first], 1.0, seed=0)
    dropout(model, True)  # a training step: round 0 is out
    assert all(torch.equal(t[first.rows[i]], reference[i][first.rows[i]]) for i, t in _tables(model).items())
    dropout(model, False)  # a checkpoint: every round is in
    assert all(torch.equal(t, final[i]) for i, t in _tables(model).items())
    stream = stream_method(setup, parts, "smf_kl", HYPERS["smf_kl"], progress=False)  # round dropout by default
    assert all(torch.equal(stream.patches[0].values[i], first.values[i]) for i in first.rows)  # nothing before it
    assert any(not torch.equal(stream.patches[1].values[i], sequential.patches[1].values[i]) for i in first.rows)
    both = apply_patch(apply_patch(copy.deepcopy(setup.model), stream.patches[0]), stream.patches[1])
    assert all(torch.equal(t, _tables(stream.model)[i]) for i, t in _tables(both).items())  # both in at the end


def test_a_rounds_scores_come_from_one_generation_without_the_known_answers_losses(streamed):
    setup, parts, stream = streamed
    recalls, scores = score_rounds(setup, stream.model, parts)
    assert recalls == round_recalls(stream.model, setup.tokenizer, parts)
    graded = evaluate(replace(setup, facts=[f for part in parts for f in part]), stream.model, full=False)
    assert scores == {k: v for k, v in graded.items() if k not in ("known_answer_nll", "known_nll_increase")}


def test_fp32_patches_are_exact_and_int8_ones_within_half_a_step(streamed):
    setup, parts, stream = streamed  # int8 patches by default
    exact = stream_method(setup, parts[:1], "smf_kl", HYPERS["smf_kl"], progress=False, precision="fp32")
    coded, plain = stream.patches[0], exact.patches[0]
    assert plain.codes is None and coded.codes is not None
    for i, rows in plain.rows.items():  # the same training; only the saved values differ
        assert torch.equal(rows, coded.rows[i])
        assert ((coded.values[i] - plain.values[i]).abs() <= coded.scales[i][:, None] / 2 * (1 + 1e-5)).all()
    with pytest.raises(ValueError, match="precision must be one of"):
        stream_method(setup, parts, "smf_kl", HYPERS["smf_kl"], progress=False, precision="int4")


def test_rounds_stop_on_recall_checks_alone(streamed):
    setup, parts, _ = streamed
    run = train_method(setup, "smf_kl", HYPERS["smf_kl"], max_steps=4, eval_every=2, recall_only=True,
                       progress=False)
    assert [set(c) for c in run.checkpoints[1:]] == [{"step", "fact_recall"}] * 2  # no forgetting figures
    assert [c["step"] for c in run.checkpoints] == [0, 2, 4]


def test_a_stream_scores_step_zero_as_it_scores_its_rounds():
    setup = prepare("tiny", "test", progress=False, full_base=False)
    assert not {"answer_bleed_pct", "known_fact_gain_pct", "paraphrase_by_format"} & set(setup.base)
    _, scores = score_rounds(setup, setup.model, [setup.facts])
    assert scores["paraphrase_recall"] == setup.base["paraphrase_recall"] == setup.base["paraphrase_recall_sampled"]


def test_backward_transfer_is_the_mean_change_of_earlier_rounds():
    retention = [[0.9], [0.6, 1.0], [0.3, 0.8, 0.9]]  # after round j: recall of rounds 0..j
    assert backward_transfer(retention) == pytest.approx(((0.3 - 0.9) + (0.8 - 1.0)) / 2)
    assert backward_transfer([[0.7]]) == 0.0


def test_split_rounds_gives_equal_consecutive_parts():
    facts = load_facts(limit=7)
    parts = split_rounds(facts, 3)
    assert [len(p) for p in parts] == [2, 2, 2] and [f for p in parts for f in p] == facts[:6]


@pytest.mark.parametrize("option, message", [(["--rounds", "0"], "at least 1"),
                                             (["--rounds", "7"], "need at least 7 facts"),
                                             (["--round-dropout", "2"], "must lie in [0, 1]"),
                                             (["--fit-gates", "-1"], "number of steps >= 0"),
                                             (["--rounds", "2", "--facts-per-round", "68"], "between 1 and 67")])
def test_bad_rounds_fail_with_a_clear_error(option, message, capsys, tmp_path):
    assert main(["stream", "--profile", "tiny", *option, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_the_command_line_takes_the_seed_and_the_precision(tmp_path):
    args = ["--methods", "smf_kl", "--rounds", "2", "--facts-per-round", "1", "--fit-gates", "0", "--seed", "3",
            "--precision", "fp32"]
    assert main(["stream", "--profile", "tiny", *args, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["train_precision"] == "fp32"
    assert summary["methods"]["smf_kl"]["hyper"]["precision"] == "fp32"


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "auto")])
def test_auto_precision_trains_in_bf16_only_where_the_cpu_has_it(native, expected, monkeypatch):
    monkeypatch.setattr("smf_lib.stream._cpu_has_bf16", lambda: native)
    monkeypatch.setattr("smf_lib.stream.default_device", lambda: torch.device("cpu"))
    assert train_precision("auto") == expected  # the trainer's "auto" is fp32 on a CPU
    assert train_precision("fp32") == "fp32" and train_precision("bf16") == "bf16"


def test_a_stream_with_trained_gates_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="run the stream with gate_lr=0"):
        run_stream("tiny", ["smf_kl"], rounds=2, out=tmp_path, hypers={"smf_kl": {"gate_lr": 1e-3}}, progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("options, message", [
    ({"lock": False, "independent": True}, "need locked rounds"), ({"lock": False, "round_dropout": 0.5}, "locked"),
    ({"independent": True, "round_dropout": 0.5}, "does not combine"), ({"round_dropout": 1.5}, r"in \[0, 1\]"),
    ({"train_in": "fp16"}, "--precision must be one of auto, fp32, bf16")])
def test_rounds_that_cannot_be_taken_apart_are_refused_before_anything_loads(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_stream("tiny", ["smf_kl"], rounds=2, out=tmp_path, hypers=HYPERS, progress=False, **options)
    assert not any(tmp_path.iterdir())
