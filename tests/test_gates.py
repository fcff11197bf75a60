"""Gates fitted on practice facts: only the gates change, the memory stays silent, later facts still make patches."""

import copy
import dataclasses

import pytest
import torch

from smf_lib.analysis import gate_openness
from smf_lib.data import load_facts
from smf_lib.gates import fit_gates, practice_facts
from smf_lib.models import load_base_model
from smf_lib.patches import make_patch
from smf_lib.retrofit import RetrofitError, memory_layers, retrofit
from smf_lib.training import TrainConfig, train

PRACTICE = load_facts(split="tune")[:8]


@pytest.fixture(scope="module")
def fitted(tiny_ready):
    """The tiny retrofitted model and a copy whose gates were fitted on eight practice facts."""
    model, tokenizer, background = tiny_ready
    gated = copy.deepcopy(model)
    info = fit_gates(gated, tokenizer, PRACTICE, background, steps=20, config=TrainConfig(batch_size=4, top_t=16),
                     progress=False)
    return model, gated, info


def test_fitting_changes_the_gates_alone_and_the_model_computes_what_it_did(fitted, tiny_ready):
    model, gated, info = fitted
    tokenizer = tiny_ready[1]
    assert info["facts"] == 8 and info["steps"] == 20 and info["gate_lr"] > 0 and info["locality"] > 0
    pairs = zip(model.named_parameters(), gated.named_parameters())
    changed = {name for (name, a), (_, b) in pairs if not torch.equal(a, b)}
    assert changed == {f"{n}.gate.weight" for n, m in model.named_modules() if m in memory_layers(model)}
    assert all(not m.values.weight.any() for m in memory_layers(gated))  # the memory still adds nothing
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    assert torch.equal(model(**batch).logits, gated(**batch).logits)
    ordinary = [f.train[0] for f in load_facts()[50:58]]  # the background the locality term kept quiet
    assert all(ratio < 1 for ratio in gate_openness(gated, model, tokenizer, ordinary).values())


def test_facts_taught_after_fitting_still_make_a_patch_of_value_rows(fitted, tiny_ready):
    _, gated, _ = fitted
    _, tokenizer, background = tiny_ready
    taught, _ = train(copy.deepcopy(gated), tokenizer, load_facts(limit=2), TrainConfig(steps=3, batch_size=4,
                      top_t=8, locality=1.0), background, progress=False)
    assert make_patch(taught, gated).n_rows > 0


def test_practice_facts_leave_out_the_facts_to_teach_and_bad_requests_are_refused(tiny_ready, small_memory):
    model, tokenizer, background = tiny_ready
    tune = load_facts(split="tune")
    assert practice_facts(tune[:5]) == tune[5:]
    assert len(practice_facts(load_facts(split="test"))) == len(tune)
    with pytest.raises(ValueError, match="no practice facts are left"):
        practice_facts(tune)
    with pytest.raises(ValueError, match="steps >= 1"):
        fit_gates(copy.deepcopy(model), tokenizer, PRACTICE, background, steps=0)
    with pytest.raises(ValueError, match="needs a retrofitted model"):
        fit_gates(load_base_model("tiny")[0], tokenizer, PRACTICE, background, steps=1)
    base = load_base_model("tiny")[0]
    with pytest.raises(RetrofitError, match="for additive mode only"):
        retrofit(base, dataclasses.replace(small_memory, fit_gates=10, mode="replace"))
    with pytest.raises(RetrofitError, match="a number of steps >= 0"):
        retrofit(base, dataclasses.replace(small_memory, fit_gates=-1))
