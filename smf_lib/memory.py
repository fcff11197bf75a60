"""A product-key memory layer (Lample et al. 2019, arXiv 1907.05242) with Memory+ gating (Berges et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# A slot counts as read when it received at least this much softmax weight: with a sharp softmax most of the top-k
# candidates get ~1e-20 of the weight and no gradient, so they neither carry a fact nor take up the update budget.
READ_THRESHOLD = 1e-3


@dataclass
class SlotAccess:
    """What one forward read: slot `indices` and softmax `weights`, both shaped (batch, seq, heads, topk)."""

    indices: torch.Tensor
    weights: torch.Tensor


class ReadGradients:
    """The value table's gradient kept in factored form: each backward's slot indices, weights and output gradient.

    A sparse update needs the gradient of a few hundred rows, while a dense table gradient is zero-filled and
    scattered for every one of `n_slots` rows at each step. Kept this way, `rows(r)` forms only the rows asked for,
    and exactly: a row's gradient is the sum of `weight * output gradient` over every read of it.
    """

    def __init__(self) -> None:
        self.reads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.written: torch.Tensor | None = None  # bool per token of the next forward: only these reads learn

    def rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The gradient of value rows `rows` (one per row) summed over the kept backwards; None if none was kept."""
        if not self.reads:
            return None
        grad = self.reads[0][2]
        out = grad.new_zeros(len(rows), grad.shape[1])
        if not len(rows):
            return out
        ordered, order = rows.sort()
        for indices, weights, grad in self.reads:
            flat = indices.reshape(-1)
            at = torch.searchsorted(ordered, flat).clamp_max(len(rows) - 1)
            hit = (ordered[at] == flat).nonzero().squeeze(1)
            token = hit.div(indices.shape[1], rounding_mode="floor")
            out.index_add_(0, order[at[hit]], grad[token] * weights.reshape(-1)[hit, None])
        return out

    def clear(self) -> None:
        """Forget the kept backwards."""
        self.reads = []


class _KeepReadGradients(torch.autograd.Function):
    """Adds zero to a read in the forward; its backward files the reads and their output gradient for later."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                sink: ReadGradients) -> torch.Tensor:
        ctx.save_for_backward(indices, weights)
        ctx.sink, ctx.written = sink, sink.written
        return table.new_zeros(len(indices), table.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None, None]:
        indices, weights = ctx.saved_tensors
        if ctx.written is not None:
            grad = grad * ctx.written.to(grad.device, grad.dtype)[:, None]
        ctx.sink.reads.append((indices, weights, grad))
        return None, None, None, None


class ProductKeyMemory(nn.Module):
    """Product-key memory: `n_keys**2` value slots, exact top-k lookup over two sub-key tables per head.

    Output is `scale * proj(values(topk(x)) * silu(gate(x)))`; with zero-initialised values it is exactly zero,
    so adding the layer beside an MLP leaves a pretrained model's function unchanged. With `read_gradients` set,
    the value table gets no `.grad`: its gradient goes there in factored form (see `ReadGradients`).
    """

    def __init__(
        self, dim: int, n_keys: int = 128, heads: int = 4, topk: int = 32, key_dim: int = 256,
        value_dim: int | None = None, temperature: float = 0.1, qk_norm: bool = False, output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if key_dim % 2:
            raise ValueError(f"key_dim must be even (two sub-keys of key_dim/2), got {key_dim}.")
        if not 1 <= topk <= n_keys:
            raise ValueError(f"topk={topk} needs 1 <= topk <= n_keys={n_keys}: each sub-key table must hold "
                             "topk candidates.")
        if heads < 1 or temperature <= 0:
            raise ValueError(f"heads must be >= 1 and temperature > 0, got heads={heads}, temperature={temperature}.")
        self.dim, self.n_keys, self.heads, self.topk, self.key_dim = dim, n_keys, heads, topk, key_dim
        self.value_dim = value_dim or dim
        self.temperature, self.qk_norm = temperature, qk_norm
        half = key_dim // 2
        self.query = nn.Linear(dim, heads * key_dim)
        self.keys = nn.Parameter(torch.randn(2, heads, n_keys, half) / half**0.5)
        self.values = nn.EmbeddingBag(n_keys**2, self.value_dim, mode="sum")
        nn.init.zeros_(self.values.weight)
        self.gate = nn.Linear(dim, self.value_dim, bias=False)
        self.proj = nn.Linear(self.value_dim, dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(float(output_scale)))
        # Ranks (i, j) in each half's sorted top-k that can make a top-k sum: (i+1)(j+1) <= k, since every pair
        # of better ranks scores at least as high. For k=32 that is 119 pairs instead of all 1,024.
        ranks = [(i, j) for i in range(topk) for j in range(topk) if (i + 1) * (j + 1) <= topk]
        self.register_buffer("candidate_pairs", torch.tensor(ranks).T.contiguous(), persistent=False)
        self.recording = False
        self.last_access: SlotAccess | None = None
        self.read_gradients: ReadGradients | None = None
        self.locked: torch.Tensor | None = None  # bool per slot: rows sparse training may not select (lock_patch)
        self.row_dropout: tuple[float, torch.Generator] | None = None  # training reads: (probability, draws)

    @property
    def n_slots(self) -> int:
        """Number of value slots (`n_keys**2`)."""
        return self.n_keys**2

    def sub_key_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of each token of `x` (tokens, dim) against both sub-key tables: two (tokens, heads, n_keys)."""
        q = self.query(x).view(-1, self.heads, 2, self.key_dim // 2)
        keys = self.keys
        if self.qk_norm:
            q, keys = F.normalize(q, dim=-1), F.normalize(keys, dim=-1)
        return torch.einsum("nhd,hkd->nhk", q[:, :, 0], keys[0]), torch.einsum("nhd,hkd->nhk", q[:, :, 1], keys[1])

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k slots per head: `(scores, indices)`, each (tokens, heads, topk), scores descending."""
        s1, s2 = self.sub_key_scores(x)
        top1, idx1 = s1.topk(self.topk, dim=-1)
        top2, idx2 = s2.topk(self.topk, dim=-1)
        first, second = self.candidate_pairs
        scores, best = (top1[..., first] + top2[..., second]).topk(self.topk, dim=-1)
        indices = idx1.gather(-1, first[best]) * self.n_keys + idx2.gather(-1, second[best])
        return scores, indices

    def address(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots each token of `x` (tokens, dim) reads and their softmax weights: `(indices, weights)`."""
        scores, indices = self.lookup(x)
        return indices, torch.softmax(scores / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Read the memory for every position of `x` (..., dim).

        Always in the memory's own precision, also under autocast: bf16 scores tie and reorder near the top-k
        boundary, so the same input would read other slots in training than in fp32 evaluation. (The bf16 blocks
        below still perturb the input itself slightly.)
        """
        with torch.autocast(x.device.type, enabled=False):
            return self._read(x.to(self.query.weight.dtype)).to(x.dtype)

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        indices, weights = self.address(flat)
        if self.recording:
            shape = (*lead, self.heads, self.topk)
            self.last_access = SlotAccess(indices.view(shape), weights.detach().view(shape))
        bags, per_read = indices.view(len(flat), -1), weights.view(len(flat), -1).to(self.values.weight.dtype)
        table = self.values.weight
        if self.read_gradients is not None and table.requires_grad and torch.is_grad_enabled():
            if self.row_dropout is not None:
                per_read = per_read * self._kept_rows(per_read.device)[bags]
            read = F.embedding_bag(bags, table.detach(), per_sample_weights=per_read, mode="sum")
            read = read + _KeepReadGradients.apply(table, bags, per_read.detach(), self.read_gradients)
        else:
            read = self.values(bags, per_sample_weights=per_read)
        out = self.proj(read * F.silu(self.gate(flat))) * self.scale
        return out.view(*lead, self.dim)

    def _kept_rows(self, device: torch.device) -> torch.Tensor:
        """One 0/1 weight per slot, 0 with the row dropout's probability: this forward reads a dropped row as if it
        held nothing, and the weight it had is not given to the others (as a new wording reads only some of the
        rows a fact was written into, beside rows that hold nothing of it)."""
        rate, generator = self.row_dropout
        return (torch.rand(self.n_slots, generator=generator) >= rate).to(device, self.values.weight.dtype)
