"""Data-dependent addressing: whiten each memory layer's input so reads spread over all slots, and optionally
place the sub-keys where the background's queries are."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .retrofit import memory_layers
from .stats import LayerInputs, layer_inputs


@torch.no_grad()
def calibrate_queries(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128,
    eps: float = 1e-3, seed: int = 0, progress: bool = True, inputs: LayerInputs | None = None,
) -> torch.nn.Module:
    """Set each memory layer's query to a random projection of the *whitened* layer input.

    Hidden states of a pretrained model are dominated by a few high-variance directions, so a random query
    projection maps most tokens onto the same few slots, and new facts end up writing into slots that old
    knowledge reads. With `q = R Σ^{-1/2} (x - μ)` (μ, Σ measured on `texts`) every direction counts equally
    and similar-but-different contexts reach different slots. Values stay zero: the model's function is unchanged.
    `inputs` (from `layer_inputs` on the same texts) skips the pass over them.
    """
    layers = memory_layers(model)
    if not layers:
        raise ValueError("calibrate_queries needs a retrofitted model: call retrofit(model) first.")
    if inputs is None:
        inputs = layer_inputs(model, tokenizer, texts, batch_size, max_length, progress)
    inputs.check(texts)
    generator = torch.Generator().manual_seed(seed)
    for m in layers:
        x = inputs.x[m.layer_index].double().cpu()
        dim, mean = x.shape[1], x.mean(0)
        cov = torch.cov(x.T, correction=0)
        cov += eps * cov.diagonal().mean() * torch.eye(dim, dtype=cov.dtype)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        whiten = (eigvecs * eigvals.rsqrt()) @ eigvecs.T
        projection = torch.randn(m.query.out_features, dim, generator=generator, dtype=torch.float64) / dim**0.5
        weight = projection @ whiten
        m.query.weight.copy_(weight.to(m.query.weight))
        m.query.bias.copy_((-weight @ mean).to(m.query.bias))
    return model


@torch.no_grad()
def calibrate_keys(model: torch.nn.Module, inputs: LayerInputs, iterations: int = 20,
                   seed: int = 0) -> torch.nn.Module:
    """Set each head's sub-keys to spherical k-means centroids of the background's sub-queries.

    Random sub-keys cut the query space evenly whatever the data; centroids follow it, so that contexts which
    are alike read the same slots. On the tune split that made a new name's rows rows that real names read, and
    three times as many known facts were lost (docs/RESULTS.md, 2026-12-04); random keys stay the default. Needs
    query/key normalisation (centroids are directions) and calibrated queries; values stay zero.
    """
    generator = torch.Generator().manual_seed(seed)
    for m in memory_layers(model):
        if not m.qk_norm:
            raise ValueError("calibrate_keys needs MemoryConfig(qk_norm=True): its centroids are directions.")
        x = inputs.x[m.layer_index].to(m.query.weight)
        half = m.key_dim // 2
        q = F.normalize(m.query(x).view(-1, m.heads, 2, half), dim=-1)
        for h in range(m.heads):
            for j in range(2):
                m.keys[j, h] = spherical_kmeans(q[:, h, j], m.n_keys, iterations, generator).to(m.keys)
    return model


def spherical_kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """`k` unit centroids of the unit rows of `x` (cosine k-means); a cluster left empty restarts at a random row."""
    if len(x) < k:
        raise ValueError(f"k-means of {k} sub-keys needs at least {k} background tokens, got {len(x)}.")
    centroids = x[torch.randperm(len(x), generator=generator)[:k]]
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, (x @ centroids.T).argmax(1), x)
        empty = sums.norm(dim=1) == 0
        sums[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=generator)]
        centroids = F.normalize(sums, dim=1)
    return centroids
