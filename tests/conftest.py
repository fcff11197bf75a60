"""Shared fixtures: the tiny model, its small memory configuration, and a tiny model ready for sparse training.

Session-scoped models are shared: a test that changes one works on `copy.deepcopy(...)`.
"""

import pytest
import torch

from smf_lib.data import load_facts
from smf_lib.models import load_base_model
from smf_lib.optim import SparseMemoryOptimizer
from smf_lib.pipeline import prepare_memory
from smf_lib.profiles import get_profile
from smf_lib.retrofit import decoder_layers


@pytest.fixture(scope="session")
def small_memory():
    """The tiny profile's memory: two layers of 256 slots."""
    return get_profile("tiny").memory


@pytest.fixture(scope="session")
def tiny_base():
    """(model, tokenizer) of the tiny profile, not retrofitted."""
    return load_base_model("tiny")


@pytest.fixture(scope="session")
def tiny_ready(small_memory):
    """(model, tokenizer, background): the tiny model retrofitted with `small_memory`, calibrated, with background
    statistics from 30 fact sentences that the tests do not train on."""
    model, tokenizer = load_base_model("tiny")
    background = prepare_memory(model, tokenizer, [f.train[0] for f in load_facts()[50:80]], small_memory,
                                 progress=False)
    return model, tokenizer, background


@pytest.fixture
def checked_steps(monkeypatch):
    """Make every `SparseMemoryOptimizer.step` assert that the value rows it did not select at that step stay
    bit-identical (momentum or weight decay leaking into them would fail); yields the rows chosen at each step."""
    selections, step = [], SparseMemoryOptimizer.step

    def checked(self, closure=None):
        before = [t.detach().clone() for t in self.rows_optimizer.tables]
        result = step(self, closure)
        for table, old, rows in zip(self.rows_optimizer.tables, before, self.last_rows):
            unselected = torch.ones(len(table), dtype=torch.bool)
            unselected[rows] = False
            assert torch.equal(table[unselected], old[unselected]), f"step {len(selections)}: unselected rows moved"
        selections.append([r.clone() for r in self.last_rows])
        return result

    monkeypatch.setattr(SparseMemoryOptimizer, "step", checked)
    return selections


@pytest.fixture
def block_runs():
    """`block_runs(model, block)`: a list that grows by one each time decoder block `block` of `model` runs (until
    the test ends)."""
    hooks = []

    def hooked(model, block: int) -> list[int]:
        runs = []
        hooks.append(decoder_layers(model)[block].register_forward_pre_hook(lambda module, args: runs.append(1)))
        return runs

    yield hooked
    for hook in hooks:
        hook.remove()
