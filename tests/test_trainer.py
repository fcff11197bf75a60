"""Sparse memory finetuning in someone else's training loop: Hugging Face `Trainer` with a SparseMemoryOptimizer."""

import copy

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from smf_lib.data import load_facts
from smf_lib.optim import SparseMemoryOptimizer
from smf_lib.retrofit import memory_layers


def _trainer(model, tokenizer, optimizer, out, **args) -> Trainer:
    sentences = [s for f in load_facts(limit=4) for s in f.train]
    settings = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, lr_scheduler_type="constant",
                    report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
                    seed=0) | args
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=[tokenizer(s) for s in sentences],
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                   optimizers=(optimizer, None))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_moves_only_the_selected_rows(tiny_ready, tmp_path, checked_steps, accumulation):
    base, tokenizer, background = tiny_ready
    model = copy.deepcopy(base)
    optimizer = SparseMemoryOptimizer(model, background, lr=0.5, top_t=8)
    result = _trainer(model, tokenizer, optimizer, tmp_path, gradient_accumulation_steps=accumulation).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len(checked_steps) == 3 and all(len(rows) for step in checked_steps for rows in step)
    old = dict(base.named_parameters())
    for name, p in model.named_parameters():
        if not name.endswith("values.weight"):
            assert torch.equal(p, old[name]), name
    for before, after, *rows in zip(memory_layers(base), memory_layers(model), *checked_steps):
        selected = torch.cat(rows)
        assert not torch.equal(after.values.weight[selected], before.values.weight[selected])
    optimizer.detach()
    assert not model._forward_pre_hooks


def test_slots_are_counted_where_labels_train(tiny_ready):
    base, tokenizer, background = tiny_ready
    model = copy.deepcopy(base)
    optimizer = SparseMemoryOptimizer(model, background)
    batch = tokenizer(["The capital of Zorvania is Quellport."], return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -2:] = batch["input_ids"][0, -2:]  # only the last two tokens are trained on
    model(**batch, labels=labels)
    counted = sum(float(c.sum()) for c in optimizer.counts.values())
    heads = memory_layers(model)[0].heads
    assert counted == pytest.approx(2 * heads * len(optimizer.layers))  # two predicting positions, weights sum to 1
    with torch.no_grad():
        model(**batch)  # evaluation is not counted
    assert sum(float(c.sum()) for c in optimizer.counts.values()) == pytest.approx(counted)
    optimizer.detach()


def test_step_without_a_forward_is_a_clear_error(tiny_ready):
    base, _, background = tiny_ready
    optimizer = SparseMemoryOptimizer(copy.deepcopy(base), background)
    with pytest.raises(RuntimeError, match="no forward pass since the last step"):
        optimizer.step()
    optimizer.detach()


def test_state_dict_round_trip_keeps_the_row_moments(tiny_ready, tmp_path):
    base, tokenizer, background = tiny_ready
    model = copy.deepcopy(base)
    optimizer = SparseMemoryOptimizer(model, background, lr=0.5, top_t=8)
    _trainer(model, tokenizer, optimizer, tmp_path).train()
    saved = copy.deepcopy(optimizer.state_dict())
    restored = SparseMemoryOptimizer(copy.deepcopy(model), background, lr=0.5, top_t=8)
    restored.load_state_dict(saved)
    for ours, theirs in zip(optimizer.rows_optimizer.state, restored.rows_optimizer.state):
        assert theirs["slot_of"].dtype == torch.long and ours["m"].abs().sum() > 0
        assert all(torch.equal(ours[k], theirs[k]) for k in ("slot_of", "m", "v", "steps"))
    optimizer.detach()
    restored.detach()


def test_detach_restores_what_the_optimizer_changed(tiny_ready):
    base, _, background = tiny_ready
    model = copy.deepcopy(base)
    before = [p.requires_grad for p in model.parameters()]
    optimizer = SparseMemoryOptimizer(model, background)
    assert sum(p.requires_grad for p in model.parameters()) == len(memory_layers(model))  # the value tables
    optimizer.detach()
    assert [p.requires_grad for p in model.parameters()] == before
    with pytest.raises(ValueError, match="no weight decay"):
        SparseMemoryOptimizer(model, background, rule="sgd", weight_decay=0.1)


def test_factored_gradients_select_and_move_the_rows_dense_ones_do(tiny_ready):
    """Kept factored, the tables' gradient makes the same selections and, up to summation order, the same updates as
    the dense one, over steps with two micro-batches."""
    base, tokenizer, background = tiny_ready
    sentences = [s for f in load_facts(limit=6) for s in f.train]
    batches = [tokenizer(sentences[i:i + 3], return_tensors="pt", padding=True) for i in range(0, 12, 3)]
    runs = []
    for factored in (True, False):
        model = copy.deepcopy(base)
        optimizer = SparseMemoryOptimizer(model, background, lr=0.5, top_t=8, factored=factored)
        selections = []
        for first, second in zip(batches[::2], batches[1::2]):
            for batch in (first, second):
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                model(**batch, labels=labels).loss.backward()
            kept_factored = all(m.values.weight.grad is None for m in optimizer.layers)
            optimizer.step()
            optimizer.zero_grad()
            selections.append([r.tolist() for r in optimizer.last_rows])
        runs.append((kept_factored, selections, [m.values.weight.detach().clone() for m in optimizer.layers]))
        optimizer.detach()
    (factored, rows, values), (dense_factored, dense_rows, dense_values) = runs
    assert factored and not dense_factored
    assert rows == dense_rows and all(len(r) for step in rows for r in step)
    for ours, theirs in zip(values, dense_values):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_rows_learn_only_from_counted_reads_when_asked(tiny_ready):
    """With write_on="counted" the kept output gradient is zero at every token outside count_at's mask and intact
    inside it; without factored gradients the option is refused."""
    base, tokenizer, background = tiny_ready
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="needs factored=True"):
        SparseMemoryOptimizer(model, background, write_on="counted")
    optimizer = SparseMemoryOptimizer(model, background, factored=True, write_on="counted")
    batch = tokenizer(["Grathine Pomirnard was born in Thapowick."], return_tensors="pt")
    counted = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    counted[0, :3] = True
    optimizer.count_at(counted)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for sink in optimizer._read_gradients:
        (_, _, grad), = sink.reads
        assert grad[:3].abs().sum(dim=1).gt(0).all() and not grad[3:].any()
    optimizer.step()
    assert all(len(rows) for rows in optimizer.last_rows)
    optimizer.detach()
