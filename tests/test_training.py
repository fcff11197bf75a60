"""The sparse trainer is exact (unselected rows never move), deterministic, and the baselines run."""

import copy

import pytest
import torch

from smf_lib import training
from smf_lib.data import load_facts
from smf_lib.models import load_base_model
from smf_lib.retrofit import MemoryConfig, memory_layers, retrofit
from smf_lib.stats import collect_background
from smf_lib.training import METHODS, TrainConfig, train

FACTS = load_facts(limit=4)
SMALL = MemoryConfig(n_keys=16, topk=4, key_dim=32)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_base_model("tiny")
    retrofit(model, SMALL)
    background = collect_background(model, tokenizer, [f.train[0] for f in load_facts()[50:80]], progress=False)
    return model, tokenizer, background


def _trained(tiny, **config):
    model, tokenizer, background = tiny
    return train(copy.deepcopy(model), tokenizer, FACTS, TrainConfig(**config), background=background, progress=False)


@pytest.mark.parametrize("optimizer,weight_decay", [("sgd", 0.0), ("adam", 0.1)])
def test_unselected_rows_and_base_are_bit_identical(tiny, optimizer, weight_decay, monkeypatch):
    model, tokenizer, background = tiny
    before = copy.deepcopy(model)
    selected = {m.layer_index: set() for m in memory_layers(model)}
    choose = training.SparseUpdate.rows

    def remember(self, counts):  # note every row selected on any step
        rows = choose(self, counts)
        for m, r in zip(self.layers, rows):
            selected[m.layer_index].update(r.tolist())
        return rows

    monkeypatch.setattr(training.SparseUpdate, "rows", remember)
    config = TrainConfig(steps=5, batch_size=4, top_t=8, optimizer=optimizer, weight_decay=weight_decay, lr=0.5)
    trained, _ = train(copy.deepcopy(model), tokenizer, FACTS, config, background=background, progress=False)
    old = dict(before.named_parameters())
    for name, p in trained.named_parameters():
        if not name.endswith("values.weight"):
            assert torch.equal(p, old[name]), name
    for m_old, m_new in zip(memory_layers(before), memory_layers(trained)):
        rows = sorted(selected[m_new.layer_index])
        unselected = torch.ones(m_new.n_slots, dtype=torch.bool)
        unselected[rows] = False
        assert rows, "some rows must be selected"
        assert torch.equal(m_new.values.weight[unselected], m_old.values.weight[unselected])
        changed = (m_new.values.weight[rows] != m_old.values.weight[rows]).any(1)
        assert changed.any()


def test_same_seed_same_result(tiny):
    a, ha = _trained(tiny, method="smf_kl", steps=3, batch_size=4, top_t=8)
    b, hb = _trained(tiny, method="smf_kl", steps=3, batch_size=4, top_t=8)
    assert ha.loss == hb.loss
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_through_one_api(tiny, method):
    model, _, _ = tiny
    trained, history = _trained(tiny, method=method, steps=3, batch_size=4)
    assert len(history.loss) == 3 and all(torch.isfinite(torch.tensor(history.loss)))
    assert history.params_trained > 0
    assert type(trained) is type(model)  # LoRA is merged back
    changed = sum(int((p != q).sum()) for p, q in zip(trained.parameters(), model.parameters()))
    assert changed > 0


def test_callback_can_stop_training(tiny):
    model, tokenizer, background = tiny
    _, history = train(copy.deepcopy(model), tokenizer, FACTS, TrainConfig(steps=10, batch_size=4), background=background,
                       progress=False, callback=lambda step, m: {"x": step, "stop": step == 2})
    assert len(history.loss) == 2 and history.checkpoints == [{"step": 1, "x": 1}, {"step": 2, "x": 2}]


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="Unknown method"):
        TrainConfig(method="smf_magic")
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")


def test_sparse_method_needs_background(tiny):
    model, tokenizer, _ = tiny
    with pytest.raises(ValueError, match="background"):
        train(copy.deepcopy(model), tokenizer, FACTS, TrainConfig(steps=1), background=None, progress=False)
