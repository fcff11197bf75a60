"""Slot scores (KL, TF-IDF, random), token-level surprise and top-t selection."""

from __future__ import annotations

import torch

from .memory import READ_THRESHOLD, SlotAccess


def touched(batch_counts: torch.Tensor) -> torch.Tensor:
    """Which slots the batch really read (total weight at least READ_THRESHOLD)."""
    return batch_counts >= READ_THRESHOLD


def background_distribution(background_counts: torch.Tensor) -> torch.Tensor:
    """`p_bg`: the background's slot-use distribution with add-one smoothing, so no slot has probability zero."""
    counts = background_counts.double()
    return (counts + 1) / (counts.sum() + counts.numel())


def kl_scores(batch_counts: torch.Tensor, background_counts: torch.Tensor) -> torch.Tensor:
    """KL contribution of each slot, `p_b(i) log(p_b(i)/p_bg(i))` (Goyal et al., arXiv 2604.05248).

    `p_bg` is add-one smoothed; slots the batch did not touch score -inf.
    """
    p_b = batch_counts / batch_counts.sum().clamp_min(1e-12)
    score = p_b * torch.log(p_b / background_distribution(background_counts).to(p_b))
    return torch.where(touched(batch_counts), score, torch.full_like(score, -torch.inf))


def tfidf_scores(batch_counts: torch.Tensor, doc_freq: torch.Tensor, n_batches: int) -> torch.Tensor:
    """TF-IDF of each slot, `p_b(i) log((B+1)/(df(i)+1))` (Lin et al., arXiv 2510.15103); untouched: -inf."""
    p_b = batch_counts / batch_counts.sum().clamp_min(1e-12)
    score = p_b * torch.log(torch.tensor(n_batches + 1.0, dtype=p_b.dtype) / (doc_freq.to(p_b.dtype) + 1))
    return torch.where(touched(batch_counts), score, torch.full_like(score, -torch.inf))


def random_scores(batch_counts: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random positive score for each touched slot (the ablation: selection without surprise)."""
    noise = torch.rand(batch_counts.shape, generator=generator, dtype=torch.float64) + 1e-6
    return torch.where(touched(batch_counts), noise.to(batch_counts.dtype), torch.full_like(batch_counts, -torch.inf))


def select_top(scores: torch.Tensor, t: int) -> torch.Tensor:
    """Indices of the `t` highest-scoring slots among those with a positive score; ties go to the lower index."""
    order = torch.sort(scores, descending=True, stable=True).indices[:t]
    return order[scores[order] > 0]


def top_t_overlap(scores_a: torch.Tensor, scores_b: torch.Tensor, t: int) -> float:
    """Share of the top-`t` selection by `scores_a` that the selection by `scores_b` also makes."""
    a = select_top(scores_a, t)
    return len(set(a.tolist()) & set(select_top(scores_b, t).tolist())) / max(len(a), 1)


def token_surprise(access: SlotAccess, batch_counts: torch.Tensor, background_counts: torch.Tensor) -> torch.Tensor:
    """Per token (batch x seq): how surprising the slots it read are, `sum_hk w log(p_b(i)/p_bg(i)) / heads`.

    The same log ratio the KL score uses, weighted by how much the token read each slot: high where a token
    leans on slots that this batch uses far more than background text does.
    """
    p_b = batch_counts / batch_counts.sum().clamp_min(1e-12)
    log_ratio = torch.log(p_b.clamp_min(1e-30) / background_distribution(background_counts).to(p_b))
    heads = access.indices.shape[-2]
    return (access.weights.double() * log_ratio[access.indices]).sum((-1, -2)) / heads
