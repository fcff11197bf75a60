"""Data-dependent addressing: whiten each memory layer's input so reads spread over all slots, optionally only
along the directions that tell facts apart, and optionally place the sub-keys where the background's queries are."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data import Fact
from .retrofit import memory_layers
from .stats import LayerInputs, layer_inputs


@torch.no_grad()
def calibrate_queries(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128,
    eps: float = 1e-3, seed: int = 0, progress: bool = True, inputs: LayerInputs | None = None,
    directions: dict[int, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """Set each memory layer's query to a random projection of the *whitened* layer input.

    Hidden states of a pretrained model are dominated by a few high-variance directions, so a random query
    projection maps most tokens onto the same few slots, and new facts end up writing into slots that old
    knowledge reads. With `q = R Σ^{-1/2} (x - μ)` (μ, Σ measured on `texts`) every direction counts equally
    and similar-but-different contexts reach different slots. Values stay zero: the model's function is unchanged.
    `inputs` (from `layer_inputs` on the same texts) skips the pass over them. With `directions` (layer index ->
    (r, dim), from `discriminant_directions`) the query is `R D (x - μ)` instead: it sees only those r directions.
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
        mean = x.mean(0)
        whiten = directions[m.layer_index].double().cpu() if directions is not None else _whitening(x, eps)
        projection = torch.randn(m.query.out_features, len(whiten), generator=generator, dtype=torch.float64)
        projection /= len(whiten) ** 0.5
        weight = projection @ whiten
        m.query.weight.copy_(weight.to(m.query.weight))
        m.query.bias.copy_((-weight @ mean).to(m.query.bias))
    return model


def _whitening(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Σ^{-1/2} of the rows of `x`, with `eps` times the mean variance added to the diagonal."""
    cov = torch.cov(x.T, correction=0)
    return _inverse_root(cov + eps * cov.diagonal().mean() * torch.eye(x.shape[1], dtype=cov.dtype))


def _inverse_root(matrix: torch.Tensor) -> torch.Tensor:
    """M^{-1/2} of a symmetric positive definite matrix."""
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    return (eigvecs * eigvals.rsqrt()) @ eigvecs.T


@torch.no_grad()
def answer_contexts(model: torch.nn.Module, tokenizer, facts: Sequence[Fact]) -> tuple[dict, torch.Tensor]:
    """Each memory layer's input at the token before each fact's answer, in every training sentence that holds
    it and in the probe: `(layer index -> contexts x dim, the index of each context's fact)`."""
    prompts, owner = [], []
    for k, fact in enumerate(facts):
        starts = [s.lower().find(fact.answer.lower()) for s in fact.train]
        found = [s[:i].rstrip() for s, i in zip(fact.train, starts) if i > 0 and s[:i].strip()]
        prompts += [*found, fact.probe]
        owner += [k] * (len(found) + 1)
    inputs = layer_inputs(model, tokenizer, prompts, progress=False)
    last = torch.searchsorted(inputs.text, torch.arange(len(prompts), device=inputs.text.device), right=True) - 1
    return {i: x[last] for i, x in inputs.x.items()}, torch.tensor(owner)


def discriminant_directions(background: torch.Tensor, contexts: torch.Tensor, owner: torch.Tensor,
                            rank: int) -> torch.Tensor:
    """The `rank` directions in which facts' answer contexts differ most from each other, against how much the
    contexts of one fact (its wordings) and the background vary there (Fisher's discriminant): (rank, dim), each
    scaled to unit variance over the background.

    Whitening gives every direction of the input the same weight, and a new wording of a question moves the input
    along many of them, so it reads other slots than the trained wording. Queries built from these directions
    alone move less with the wording than with the fact (docs/RESULTS.md, "Queries that see what tells facts apart").
    """
    n_facts = int(owner.max()) + 1
    if not 0 < rank < n_facts:
        raise ValueError(f"query_rank={rank} needs more than {rank} practice facts (there are {n_facts}): the facts' "
                         "means span at most one direction fewer than there are facts.")
    x, c = background.double().cpu(), contexts.double().cpu()
    mean, total = x.mean(0), torch.cov(x.T, correction=0)
    counts = torch.bincount(owner, minlength=n_facts).double()
    means = torch.zeros(n_facts, c.shape[1], dtype=c.dtype).index_add_(0, owner, c) / counts[:, None]
    residual = c - means[owner]
    within = residual.T @ residual / len(c) + total  # the background's spread keeps rare directions from dominating
    inverse_root = _inverse_root(within)
    _, axes = torch.linalg.eigh(inverse_root @ torch.cov(means.T, correction=0) @ inverse_root)
    directions = axes[:, -rank:].T @ inverse_root
    return directions / ((x - mean) @ directions.T).std(0)[:, None]


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
