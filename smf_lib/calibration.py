"""Data-dependent query initialisation: whiten each memory layer's input so addressing spreads over all slots."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .retrofit import memory_layers


@torch.no_grad()
def calibrate_queries(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128,
    eps: float = 1e-3, seed: int = 0, progress: bool = True,
) -> torch.nn.Module:
    """Set each memory layer's query to a random projection of the *whitened* layer input.

    Hidden states of a pretrained model are dominated by a few high-variance directions, so a random query
    projection maps most tokens onto the same few slots, and new facts end up writing into slots that old
    knowledge reads. With `q = R Σ^{-1/2} (x - μ)` (μ, Σ measured on `texts`) every direction counts equally
    and similar-but-different contexts reach different slots. Values stay zero: the model's function is unchanged.
    """
    layers = memory_layers(model)
    if not layers:
        raise ValueError("calibrate_queries needs a retrofitted model: call retrofit(model) first.")
    dim = layers[0].dim
    sums = {m.layer_index: torch.zeros(dim, dtype=torch.float64) for m in layers}
    outer = {m.layer_index: torch.zeros(dim, dim, dtype=torch.float64) for m in layers}
    count = {m.layer_index: 0 for m in layers}
    mask: list[torch.Tensor] = []

    def accumulate(module, args):
        x = args[0][mask[0]].double().cpu()
        sums[module.layer_index] += x.sum(0)
        outer[module.layer_index] += x.T @ x
        count[module.layer_index] += len(x)

    hooks = [m.register_forward_pre_hook(accumulate) for m in layers]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="calibrating queries", disable=not progress):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            mask[:] = [batch["attention_mask"].bool()]
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    generator = torch.Generator().manual_seed(seed)
    for m in layers:
        n = count[m.layer_index]
        mean = sums[m.layer_index] / n
        cov = outer[m.layer_index] / n - torch.outer(mean, mean)
        cov += eps * cov.diagonal().mean() * torch.eye(dim, dtype=cov.dtype)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        whiten = (eigvecs * eigvals.rsqrt()) @ eigvecs.T
        projection = torch.randn(m.query.out_features, dim, generator=generator, dtype=torch.float64) / dim**0.5
        weight = projection @ whiten
        m.query.weight.copy_(weight.to(m.query.weight))
        m.query.bias.copy_((-weight @ mean).to(m.query.bias))
    return model
