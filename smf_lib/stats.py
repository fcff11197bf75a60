"""Slot-access statistics: how much each memory slot is used, on background text and on a training batch."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .memory import ProductKeyMemory
from .retrofit import atomic_save, memory_layers


@contextmanager
def recording(model: torch.nn.Module, enabled: bool = True) -> Iterator[list[ProductKeyMemory]]:
    """Make every memory layer keep the slot indices and weights of its last forward."""
    layers = memory_layers(model)
    before = [m.recording for m in layers]
    for m in layers:
        m.recording = enabled
    try:
        yield layers
    finally:
        for m, was in zip(layers, before):
            m.recording, m.last_access = was, None


def slot_counts(model: torch.nn.Module, positions: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Soft access counts per layer from the last recorded forward: the softmax weight each slot received,
    summed over the chosen `positions` (bool, batch x seq; all when None), heads and top-k.

    Weights rather than raw top-k membership: with a sharp softmax most of the k candidates carry ~0 weight
    and get ~0 gradient, so counting them would spend the update budget on slots the batch does not use.
    """
    counts = {}
    for m in memory_layers(model):
        if m.last_access is None:
            raise RuntimeError("No recorded forward: run the model inside `with recording(model):` first.")
        idx, w = m.last_access.indices, m.last_access.weights
        if positions is not None:
            idx, w = idx[positions], w[positions]
        counts[m.layer_index] = torch.bincount(idx.reshape(-1), w.reshape(-1).double(), minlength=m.n_slots)
    return counts


@dataclass
class SlotStats:
    """Background statistics per memory layer: soft access `counts` and document frequency `doc_freq`
    (how many of the `n_batches` background batches touched each slot)."""

    counts: dict[int, torch.Tensor]
    doc_freq: dict[int, torch.Tensor]
    n_batches: int
    n_tokens: int

    def save(self, path: str | Path) -> Path:
        """Write to safetensors, atomically."""
        tensors = {f"counts.{i}": c for i, c in self.counts.items()} | {f"doc_freq.{i}": d for i, d in self.doc_freq.items()}
        meta = {"n_batches": str(self.n_batches), "n_tokens": str(self.n_tokens), "layers": json.dumps(sorted(self.counts))}
        atomic_save(tensors, Path(path), meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "SlotStats":
        """Read statistics written by `save`."""
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        layers = json.loads(meta["layers"])
        return cls({i: tensors[f"counts.{i}"] for i in layers}, {i: tensors[f"doc_freq.{i}"] for i in layers},
                   int(meta["n_batches"]), int(meta["n_tokens"]))


@torch.no_grad()
def collect_background(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 1, max_length: int = 128,
    progress: bool = True,
) -> SlotStats:
    """Stream `texts` through the model in batches and accumulate slot statistics (memory O(slots)).

    Each batch is one "document" for the document frequency; Lin et al. use single-example batches.
    """
    layers = memory_layers(model)
    counts = {m.layer_index: torch.zeros(m.n_slots, dtype=torch.float64) for m in layers}
    doc_freq = {m.layer_index: torch.zeros(m.n_slots, dtype=torch.float64) for m in layers}
    device = next(model.parameters()).device
    n_batches = n_tokens = 0
    starts = range(0, len(texts), batch_size)
    with recording(model):
        for start in tqdm(starts, desc="background statistics", disable=not progress):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            model(**batch)
            mask = batch["attention_mask"].bool()
            for i, c in slot_counts(model, mask).items():
                counts[i] += c.cpu()
                doc_freq[i] += (c.cpu() > 0).double()
            n_batches += 1
            n_tokens += int(mask.sum())
    return SlotStats(counts, doc_freq, n_batches, n_tokens)
