"""A packed batch is the padded batch without its padding: every sentence gets the losses and gradients of its
padded row, and training learns the same, on the tiny model and on SmolLM2."""

import copy

import pytest
import torch

from smf_lib.batches import build_examples, collate
from smf_lib.data import load_facts
from smf_lib.models import load_base_model
from smf_lib.packing import pack, packs_exactly, token_losses
from smf_lib.retrofit import memory_layers
from smf_lib.training import TrainConfig, train

FACTS = load_facts(limit=4)


def _batch(tokenizer, facts=FACTS):
    examples = build_examples(facts, tokenizer)
    assert len({len(e.input_ids) for e in examples}) > 1  # sentences of several lengths: there is padding to drop
    return collate(examples, tokenizer.pad_token_id, torch.device("cpu"))


def _own_positions(batch):
    """Positions whose next token is a real token of their own sentence."""
    mask = batch["attention_mask"]
    return mask & torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)


def test_pack_keeps_the_real_tokens_in_order_with_each_sentences_own_positions(tiny_ready):
    _, tokenizer, _ = tiny_ready
    batch = _batch(tokenizer)
    inputs = pack(batch)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert inputs["input_ids"].shape == (1, sum(lengths))
    assert inputs["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert inputs["input_ids"][0].tolist() == [t for row, n in zip(batch["input_ids"], lengths) for t in row[:n]]


def test_a_packed_batch_gives_each_sentence_the_losses_and_gradients_of_its_padded_row(tiny_ready):
    model, tokenizer, _ = tiny_ready
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    batch, gradients, losses = _batch(tokenizer), [], []
    own = _own_positions(batch)
    for packed in (True, False):
        model.zero_grad()
        loss = token_losses(model, batch, packed)
        (loss * own).sum().backward()
        losses.append(loss[own])
        gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    assert len(gradients[0]) == len(gradients[1]) > 0
    for a, b in zip(*gradients):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert packs_exactly(model, batch)


@pytest.mark.parametrize("method", ["smf_kl", "full_ft"])
def test_training_packed_learns_what_training_padded_learns(tiny_ready, method):
    model, tokenizer, background = tiny_ready
    runs = [train(copy.deepcopy(model), tokenizer, FACTS, TrainConfig(method=method, steps=4, batch_size=4, pack=p),
                  background=background, progress=False) for p in (True, False)]
    (packed, packed_history), (padded, padded_history) = runs
    torch.testing.assert_close(packed_history.loss, padded_history.loss, rtol=1e-4, atol=1e-5)
    if method == "smf_kl":  # the same rows are written
        assert packed_history.selected == padded_history.selected
        for a, b in zip(memory_layers(packed), memory_layers(padded)):
            assert torch.equal(a.values.weight.any(1), b.values.weight.any(1))


class _IgnoresPositions(torch.nn.Module):
    """A decoder whose attention takes no positions: packed sentences would read each other."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_a_model_that_ignores_positions_trains_on_padded_batches_with_a_warning(tiny_ready):
    model, tokenizer, _ = tiny_ready
    wrapped = _IgnoresPositions(copy.deepcopy(model))
    assert not packs_exactly(wrapped, _batch(tokenizer))
    with pytest.warns(UserWarning, match="does not keep packed sentences apart"):
        _, history = train(wrapped, tokenizer, FACTS, TrainConfig(method="full_ft", steps=2, batch_size=4),
                           progress=False)
    assert len(history.loss) == 2


@pytest.mark.slow
def test_smollm2_keeps_packed_sentences_apart():
    model, tokenizer = load_base_model("smollm2-135m")
    assert packs_exactly(model, _batch(tokenizer, load_facts(limit=8)), tolerance=1e-4)
