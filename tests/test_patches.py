"""Memory patches: the rows one training changed, saved small, applied and reverted bit for bit, merged with their
collisions reported, and refused by a memory they do not fit."""

import copy

import pytest
import torch

from smf_lib.data import load_facts
from smf_lib.patches import (
    PatchError,
    apply_patch,
    load_patch,
    lock_patch,
    make_patch,
    merge_patches,
    quantize_patch,
    revert_patch,
    save_patch,
)
from smf_lib.retrofit import memory_layers
from smf_lib.training import TrainConfig, train


def _values(model):
    return [m.values.weight.detach().clone() for m in memory_layers(model)]


@pytest.fixture(scope="module")
def trained(tiny_ready):
    """The untrained reference and two models trained on different facts from it."""
    reference, tokenizer, background = tiny_ready
    config = TrainConfig(steps=3, batch_size=4, top_t=8, lr=0.5)
    first, _ = train(copy.deepcopy(reference), tokenizer, load_facts(limit=2), config, background, progress=False)
    second, _ = train(copy.deepcopy(reference), tokenizer, load_facts()[2:4], config, background, progress=False)
    return reference, first, second


def test_round_trip_through_a_file_is_bit_exact(trained, tmp_path):
    reference, first, _ = trained
    patch = save_patch(first, reference, tmp_path / "p.safetensors")
    assert 0 < patch.n_rows < sum(m.n_slots for m in memory_layers(first))
    loaded = load_patch(tmp_path / "p.safetensors")
    target = copy.deepcopy(reference)
    apply_patch(target, loaded)
    assert all(torch.equal(a, b) for a, b in zip(_values(target), _values(first)))
    revert_patch(target, loaded)
    assert all(torch.equal(a, b) for a, b in zip(_values(target), _values(reference)))
    # zero rows replaced by a fresh memory's training are not stored: the file holds the new rows only
    assert (tmp_path / "p.safetensors").stat().st_size < 1.2 * sum(v.numel() * 4 for v in patch.values.values()) + 4096


def test_an_int8_patch_is_a_quarter_of_the_bytes_within_half_a_step_and_reverts_bit_for_bit(trained, tmp_path):
    reference, first, _ = trained
    exact = save_patch(first, reference, tmp_path / "exact.safetensors")
    coded = save_patch(first, reference, tmp_path / "int8.safetensors", precision="int8")
    loaded = load_patch(tmp_path / "int8.safetensors")
    assert all(torch.equal(loaded.values[i], coded.values[i]) for i in coded.rows)  # what is written is what ships
    for i in exact.rows:
        error = (coded.values[i] - exact.values[i]).abs()
        assert (error <= coded.scales[i][:, None] / 2 * (1 + 1e-5)).all() and error.amax() > 0
    values = sum(v.numel() for v in exact.values.values())  # float32 bytes per value 4, int8 1 (plus headers)
    sizes = [(tmp_path / f"{name}.safetensors").stat().st_size for name in ("exact", "int8")]
    assert sizes[0] - sizes[1] > 0.95 * 3 * values
    target = apply_patch(copy.deepcopy(reference), loaded)
    revert_patch(target, loaded)
    assert all(torch.equal(a, b) for a, b in zip(_values(target), _values(reference)))
    assert quantize_patch(exact).codes[next(iter(exact.rows))].dtype == torch.int8
    with pytest.raises(ValueError, match="precision must be one of fp32, int8"):
        save_patch(first, reference, tmp_path / "p.safetensors", precision="int4")
    (tmp_path / "bad.safetensors").write_bytes(b"not a patch")
    with pytest.raises(PatchError, match="is not a memory patch"):
        load_patch(tmp_path / "bad.safetensors")


def test_a_mismatched_memory_is_refused(trained, tiny_base, small_memory):
    reference, first, _ = trained
    patch = make_patch(first, reference)
    from smf_lib.retrofit import MemoryConfig, retrofit

    other_seed = retrofit(copy.deepcopy(tiny_base[0]), MemoryConfig.from_dict({**small_memory.__dict__, "seed": 7}))
    with pytest.raises(PatchError, match="addresses slots differently"):
        apply_patch(other_seed, patch)
    with pytest.raises(PatchError, match="no memory layers"):
        apply_patch(copy.deepcopy(tiny_base[0]), patch)
    applied = apply_patch(copy.deepcopy(reference), patch)
    with pytest.raises(PatchError, match="not the rows it expects"):
        apply_patch(applied, patch)  # twice


def test_merging_reports_collisions_and_resolves_them_as_asked(trained):
    reference, first, second = trained
    a, b = make_patch(first, reference), make_patch(second, reference)
    shared = {i: set(a.rows[i].tolist()) & set(b.rows[i].tolist()) for i in a.rows}
    if any(shared.values()):
        with pytest.raises(PatchError, match="Both patches change"):
            merge_patches(a, b)
    merged, collisions = merge_patches(a, b, on_collision="second")
    assert {i: set(c.tolist()) for i, c in collisions.items()} == shared
    assert {i: set(r.tolist()) for i, r in merged.rows.items()} == {
        i: set(a.rows[i].tolist()) | set(b.rows[i].tolist()) for i in a.rows}
    model = apply_patch(copy.deepcopy(reference), merged)
    for m, table in zip(memory_layers(model), _values(second)):  # rows of the second patch hold its values
        rows = b.rows[m.layer_index]
        assert torch.equal(m.values.weight[rows], table[rows])
    revert_patch(model, merged)
    assert all(torch.equal(x, y) for x, y in zip(_values(model), _values(reference)))


def test_sequential_patches_merge_into_one_that_reverts_to_the_start(trained, tiny_ready):
    reference, first, _ = trained
    _, tokenizer, background = tiny_ready
    config = TrainConfig(steps=3, batch_size=4, top_t=8, lr=0.5, seed=1)
    later, _ = train(copy.deepcopy(first), tokenizer, load_facts()[4:6], config, background, progress=False)
    merged, _ = merge_patches(make_patch(first, reference), make_patch(later, first), on_collision="second")
    model = apply_patch(copy.deepcopy(reference), merged)
    assert all(torch.equal(x, y) for x, y in zip(_values(model), _values(later)))
    revert_patch(model, merged)
    assert all(torch.equal(x, y) for x, y in zip(_values(model), _values(reference)))


def test_a_locked_patch_keeps_later_training_off_its_rows(trained, tiny_ready):
    reference, first, _ = trained
    _, tokenizer, background = tiny_ready
    patch, facts = make_patch(first, reference), load_facts(limit=2)  # the first patch's own facts read its rows
    config = TrainConfig(steps=3, batch_size=4, top_t=8, lr=0.5, seed=1)

    def shared_rows(model):
        later = make_patch(train(model, tokenizer, facts, config, background, progress=False)[0], first)
        return sum(len(set(later.rows[i].tolist()) & set(patch.rows[i].tolist())) for i in patch.rows), later

    assert shared_rows(copy.deepcopy(first))[0] > 0  # unlocked, training the same facts again rewrites them
    locked = lock_patch(copy.deepcopy(first), patch)
    shared, later = shared_rows(locked)
    assert shared == 0 and later.n_rows > 0
    revert_patch(locked, patch)  # the first patch is intact and reverts on its own; the later rows stay
    assert all(torch.equal(m.values.weight[later.rows[m.layer_index]], later.values[m.layer_index])
               for m in memory_layers(locked))
    lock_patch(locked, patch, locked=False)
    assert all(not m.locked.any() for m in memory_layers(locked))


def test_a_model_trained_with_its_gates_makes_no_patch_of_rows_alone(tiny_ready):
    reference, tokenizer, background = tiny_ready
    config = TrainConfig(steps=2, batch_size=4, top_t=8, lr=0.5, gate_lr=1e-2)
    gated, _ = train(copy.deepcopy(reference), tokenizer, load_facts(limit=2), config, background, progress=False)
    with pytest.raises(PatchError, match="gate_lr=0"):
        make_patch(gated, reference)
