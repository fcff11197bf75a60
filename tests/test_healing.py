"""Healing a replace-mode memory: it learns the replaced MLPs' work on the real model, the base stays frozen, and
misuse gets a clear error."""

import copy
from dataclasses import replace

import pytest
import torch

from smf_lib.data import load_background, load_heldout_text
from smf_lib.evaluation import perplexity
from smf_lib.healing import HealConfig, heal
from smf_lib.models import load_base_model
from smf_lib.retrofit import MemoryConfig, memory_layers, retrofit

SMALL_REPLACE = MemoryConfig(layers=(22, 27), n_keys=64, topk=16, mode="replace")


@pytest.fixture(scope="module")
def smollm():
    return load_base_model("smollm2-135m")


def test_healing_brings_a_replaced_model_back(smollm):
    base, tokenizer = smollm
    heldout = load_heldout_text()[:8]
    model = retrofit(copy.deepcopy(base), SMALL_REPLACE)
    frozen = {name: p.clone() for name, p in model.named_parameters() if ".memory." not in name}
    broken = perplexity(model, tokenizer, heldout)
    short = HealConfig(steps=100, batch_tokens=512, written=0)  # background only: a minute, not the full healing
    result = heal(model, tokenizer, load_background()[:120], short, progress=False)
    healed = perplexity(model, tokenizer, heldout)
    assert all(result.error_before[i] == pytest.approx(1.0) for i in (22, 27))  # a fresh memory outputs zero
    assert all(result.error_after[i] < 0.6 for i in (22, 27)), result  # on tokens of texts it did not train on
    assert healed < broken - 0.25 * (broken - perplexity(base, tokenizer, heldout)), (broken, healed)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert not any(".mlp.mlp." in name for name in model.state_dict())  # the replaced MLPs are out again


def test_heal_refuses_additive_and_trained_memory(smollm):
    base, tokenizer = smollm
    additive = retrofit(copy.deepcopy(base), replace(SMALL_REPLACE, mode="additive"))
    with pytest.raises(ValueError, match="nothing to heal"):
        heal(additive, tokenizer, ["Some text.", "More text."])
    trained = retrofit(copy.deepcopy(base), SMALL_REPLACE)
    with torch.no_grad():
        memory_layers(trained)[0].values.weight[0] = 1.0
    with pytest.raises(ValueError, match="fresh retrofit"):
        heal(trained, tokenizer, ["Some text.", "More text."])
    with pytest.raises(ValueError, match="at least 2 texts"):
        heal(retrofit(copy.deepcopy(base), SMALL_REPLACE), tokenizer, ["Only one."])
