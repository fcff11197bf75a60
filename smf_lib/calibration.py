"""Data-dependent query initialisation: whiten each memory layer's input so addressing spreads over all slots."""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
