"""Slot scores against hand computation, and top-t selection rules."""

import math

import torch

from smf_lib.memory import SlotAccess
from smf_lib.selection import kl_scores, random_scores, select_top, tfidf_scores, token_surprise, top_t_overlap


def test_kl_score_matches_hand_computation():
    batch = torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    background = torch.tensor([1.0, 5.0, 2.0, 0.0], dtype=torch.float64)
    scores = kl_scores(batch, background)
    p_bg = [(1 + 1) / 12, (5 + 1) / 12]  # add-one smoothing: (c + 1) / (8 + 4)
    assert math.isclose(scores[0].item(), 0.75 * math.log(0.75 / p_bg[0]))
    assert math.isclose(scores[1].item(), 0.25 * math.log(0.25 / p_bg[1]))
    assert torch.isinf(scores[2:]).all() and (scores[2:] < 0).all()


def test_tfidf_score_matches_hand_computation():
    batch = torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64)
    doc_freq = torch.tensor([0.0, 9.0, 1.0], dtype=torch.float64)
    scores = tfidf_scores(batch, doc_freq, n_batches=9)
    assert math.isclose(scores[0].item(), 0.5 * math.log(10 / 1))
    assert scores[1].item() == 0.0  # used by every background batch: no information
    assert scores[2].item() == -math.inf


def test_select_top_only_positive_touched_and_ties_to_lower_index():
    scores = torch.tensor([0.5, -math.inf, 0.5, 0.9, 0.0, -0.1, 0.5], dtype=torch.float64)
    assert select_top(scores, 3).tolist() == [3, 0, 2]
    assert select_top(scores, 10).tolist() == [3, 0, 2, 6]  # never a zero, negative or untouched slot


def test_random_scores_cover_only_touched_slots():
    counts = torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    chosen = select_top(random_scores(counts, torch.Generator().manual_seed(0)), 4)
    assert sorted(chosen.tolist()) == [0, 2]


def test_token_surprise_weights_log_ratio():
    batch = torch.tensor([4.0, 0.0, 4.0, 0.0], dtype=torch.float64)
    background = torch.tensor([0.0, 6.0, 6.0, 0.0], dtype=torch.float64)
    access = SlotAccess(torch.tensor([[[[0, 2]]]]), torch.tensor([[[[0.25, 0.75]]]]))
    p_bg = [(0 + 1) / 16, (6 + 1) / 16]
    expected = 0.25 * math.log(0.5 / p_bg[0]) + 0.75 * math.log(0.5 / p_bg[1])
    assert math.isclose(token_surprise(access, batch, background).item(), expected)


def test_top_t_overlap_counts_shared_picks_among_the_first_selection():
    a = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    b = torch.tensor([5.0, 0.0, 3.0, 4.0, 2.0])
    assert top_t_overlap(a, b, 3) == 2 / 3  # a picks {0, 1, 2}, b picks {0, 3, 2}
    assert top_t_overlap(a, a, 3) == 1.0
    assert top_t_overlap(torch.full((3,), -1.0), b, 2) == 0.0  # nothing selected: no overlap, no division by zero
