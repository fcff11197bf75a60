"""Held-out text scored from the first memory block gives the scores of a full forward, and only a model whose
lower blocks are the base model's takes that path."""

import copy

import pytest
import torch

from smf_lib.data import load_heldout_text
from smf_lib.evaluation import TextStates, heldout_scores, score_texts, text_states
from smf_lib.prefix import same_below
from smf_lib.retrofit import memory_layers

TEXTS = load_heldout_text()[:11]  # two batches of 8 and 3: the last one shorter


def _sparse_copy(base):
    """A copy of `base` whose memory rows say something, as after sparse training: the lower blocks are untouched."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    for m in memory_layers(model):
        m.values.weight.data = 0.05 * torch.randn(m.values.weight.shape, generator=generator)
    return model


def test_scores_from_the_first_memory_block_equal_those_of_a_full_forward(tiny_ready, block_runs):
    base, tokenizer, _ = tiny_ready
    model = _sparse_copy(base)
    full = score_texts(model, tokenizer, TEXTS, reference=base)
    states = text_states(base, tokenizer, TEXTS)
    assert states.block == 1 and len(states.hidden) == 2 and states.source is base
    below = block_runs(model, 0)
    fast = score_texts(model, tokenizer, TEXTS, reference=base, states=states)
    assert not below  # the block below the memory never ran for the trained model
    torch.testing.assert_close(fast.nll, full.nll)
    torch.testing.assert_close(fast.kl, full.kl)
    assert torch.equal(fast.tokens, full.tokens) and float(full.kl.sum()) > 0  # the memory did change the output


def test_only_a_model_that_shares_the_lower_blocks_starts_at_the_memory(tiny_ready, block_runs):
    base, tokenizer, _ = tiny_ready
    sparse, dense = _sparse_copy(base), _sparse_copy(base)
    with torch.no_grad():
        dense.get_input_embeddings().weight[0] += 1e-3  # one changed number below the memory
    assert same_below(sparse, base, 1) and not same_below(dense, base, 1)
    cache, base_runs, sparse_runs, dense_runs = [], block_runs(base, 0), block_runs(sparse, 0), block_runs(dense, 0)
    for _ in range(2):
        scores = heldout_scores(sparse, base, tokenizer, TEXTS, cache, kl=True)
    assert len(base_runs) == 2 and not sparse_runs  # the base's lower blocks ran once, for both scorings
    torch.testing.assert_close(scores.nll, score_texts(sparse, tokenizer, TEXTS).nll)
    heldout_scores(dense, base, tokenizer, TEXTS, cache)
    assert len(dense_runs) == 2  # a full forward per batch


def test_states_for_another_block_are_refused(tiny_ready):
    base, tokenizer, _ = tiny_ready
    states = text_states(base, tokenizer, TEXTS)
    with pytest.raises(ValueError, match="first memory block"):
        score_texts(base, tokenizer, TEXTS, states=TextStates(0, states.hidden, base))
