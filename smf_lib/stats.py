"""Slot-access statistics: how much each memory slot is used, on background text and on a training batch."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .files import save_tensors
from .memory import ProductKeyMemory, SlotAccess
from .retrofit import memory_layers

# Where background slot use is counted: every real token, or only the tokens of names and numbers, the kind of
# position where facts are counted by default (`TrainConfig.count_on="entities"`).
BACKGROUND_POSITIONS = ("all", "names")
# A capitalised word or a number; a capitalised word that opens a sentence or a line is no evidence of a name.
_NAME = re.compile(r"\b(?:[A-Z][\w'-]*|\d+(?:[.,]\d+)*)")
_OPENING = re.compile(r"(?:^|[.!?]\s+|\n\s*)$")


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
    """Soft access counts per layer from the last recorded forward (see `access_counts`)."""
    counts = {}
    for m in memory_layers(model):
        if m.last_access is None:
            raise RuntimeError("No recorded forward: run the model inside `with recording(model):` first.")
        counts[m.layer_index] = access_counts(m.last_access, m.n_slots, positions)
    return counts


def access_counts(access: SlotAccess, n_slots: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax weight each slot received, summed over the chosen `positions` (bool, batch x seq; all when
    None), heads and top-k: a float64 vector of `n_slots`.

    Weights rather than raw top-k membership: with a sharp softmax most of the k candidates carry ~0 weight
    and get ~0 gradient, so counting them would spend the update budget on slots the batch does not use.
    """
    idx, w = access.indices, access.weights
    if positions is not None:
        idx, w = idx[positions], w[positions]
    return torch.bincount(idx.reshape(-1), w.reshape(-1).double(), minlength=n_slots)


def name_positions(tokenizer, texts: Sequence[str], max_length: int = 128) -> list[list[bool]]:
    """For each text, which of its tokens (as `tokenizer(text, truncation=True, max_length=max_length)` gives them)
    overlap a name or a number: a capitalised word that does not open a sentence or a line, or digits."""
    masks = []
    for text in texts:
        spans = [m.span() for m in _NAME.finditer(text) if not _OPENING.search(text[:m.start()])]
        offsets = tokenizer(text, return_offsets_mapping=True, truncation=True,
                            max_length=max_length)["offset_mapping"]
        masks.append(tokens_overlapping(offsets, spans))
    return masks


def tokens_overlapping(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token's character span (`offsets`), whether it overlaps one of `spans`."""
    return [any(s < end and e > start for start, end in spans) for s, e in offsets]


@dataclass
class SlotStats:
    """Background statistics per memory layer: soft access `counts` and document frequency `doc_freq`
    (how many of the `n_batches` background batches touched each slot). `inputs` keeps each memory layer's input at
    a random sample of background tokens (layer -> tokens x dim), for the locality term; it is not saved."""

    counts: dict[int, torch.Tensor]
    doc_freq: dict[int, torch.Tensor]
    n_batches: int
    n_tokens: int
    inputs: dict[int, torch.Tensor] | None = None
    positions: str = "all"  # one of BACKGROUND_POSITIONS: the tokens counted

    def save(self, path: str | Path) -> Path:
        """Write to safetensors, atomically."""
        tensors = ({f"counts.{i}": c for i, c in self.counts.items()} |
                   {f"doc_freq.{i}": d for i, d in self.doc_freq.items()})
        meta = {"n_batches": str(self.n_batches), "n_tokens": str(self.n_tokens),
                "layers": json.dumps(sorted(self.counts)), "positions": self.positions}
        return save_tensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> SlotStats:
        """Read statistics written by `save`."""
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        layers = json.loads(meta["layers"])
        return cls({i: tensors[f"counts.{i}"] for i in layers}, {i: tensors[f"doc_freq.{i}"] for i in layers},
                   int(meta["n_batches"]), int(meta["n_tokens"]), positions=meta.get("positions", "all"))


@contextmanager
def capture_inputs(model: torch.nn.Module, keep=lambda x: x) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Collect every memory layer's input during the forwards inside the block: layer index -> list of
    `keep(input)`, one entry per forward (`keep` picks what to store, e.g. the real tokens only)."""
    layers = memory_layers(model)
    if not layers:
        raise ValueError("Capturing memory-layer inputs needs a retrofitted model: call retrofit(model) first.")
    captured: dict[int, list[torch.Tensor]] = {m.layer_index: [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda module, args: captured[module.layer_index].append(keep(args[0])))
             for m in layers]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


@dataclass
class LayerInputs:
    """Each memory layer's input at every real token of some texts (`x`: layer index -> tokens x dim), and the
    index of the text each token came from (`text`, ascending).

    While every value row is zero the memory adds nothing to the residual stream, so these inputs do not depend on
    the memory's queries or keys: one pass over the background serves query calibration and slot statistics.
    """

    x: dict[int, torch.Tensor]
    text: torch.Tensor
    n_texts: int

    def check(self, texts: Sequence[str]) -> None:
        """Raise if these inputs were not captured from `len(texts)` texts."""
        if self.n_texts != len(texts):
            raise ValueError(f"`inputs` were captured from {self.n_texts} texts, not these {len(texts)}; "
                             "capture them with layer_inputs(model, tokenizer, texts) on the same texts.")


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128,
                 progress: bool = True) -> LayerInputs:
    """Run `texts` through the model once and keep every memory layer's input at their real tokens."""
    device = next(model.parameters()).device
    mask: list[torch.Tensor] = []
    text = []
    with capture_inputs(model, keep=lambda x: x[mask[0]]) as captured:
        for start in tqdm(range(0, len(texts), batch_size), desc="memory-layer inputs", disable=not progress):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            mask[:] = [batch["attention_mask"].bool()]
            decoder_body(model)(**batch)
            rows = torch.arange(start, start + len(mask[0]), device=device).unsqueeze(1).expand_as(mask[0])
            text.append(rows[mask[0]])
    return LayerInputs({i: torch.cat(x) for i, x in captured.items()}, torch.cat(text), len(texts))


def decoder_body(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its language-model head: a pass that only watches the memory layers skips the logits over
    the whole vocabulary (23% of such a pass on SmolLM2-135M)."""
    return getattr(model, "get_decoder", lambda: None)() or model


@torch.no_grad()
def collect_background(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128,
    progress: bool = True, inputs: LayerInputs | None = None, positions: str = "all",
) -> SlotStats:
    """Stream `texts` through the model and accumulate slot statistics (memory O(slots), not O(tokens)).

    Each text counts as one background batch for the document frequency, like the single-example batches of
    Lin et al.; `batch_size` only sets how many texts share a forward pass. `inputs` (from `layer_inputs` on the
    same texts) skips the forward passes; they stay valid only while every value row is zero. `positions="names"`
    counts only the tokens of names and numbers (`name_positions`), where facts are counted by default.
    """
    if positions not in BACKGROUND_POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(BACKGROUND_POSITIONS)}, got {positions!r}.")
    names = name_positions(tokenizer, texts, max_length) if positions == "names" else None
    if inputs is not None:
        return _background_from_inputs(model, texts, inputs, batch_size, names)
    layers = memory_layers(model)
    counts = {m.layer_index: torch.zeros(m.n_slots, dtype=torch.float64) for m in layers}
    doc_freq = {m.layer_index: torch.zeros(m.n_slots, dtype=torch.float64) for m in layers}
    device = next(model.parameters()).device
    n_tokens = 0
    with recording(model):
        for start in tqdm(range(0, len(texts), batch_size), desc="background statistics", disable=not progress):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            decoder_body(model)(**batch)
            mask = batch["attention_mask"].bool()
            text = torch.arange(len(mask), device=device).unsqueeze(1).expand_as(mask)[mask]
            keep = _kept(names, start, start + len(mask), mask.sum(dim=1), device)
            for m in layers:
                access = m.last_access
                _add_texts(counts[m.layer_index], doc_freq[m.layer_index], access.indices[mask][keep],
                           access.weights[mask][keep], text[keep], len(mask))
            n_tokens += int(keep.sum())
    return SlotStats(counts, doc_freq, len(texts), n_tokens, positions=positions)


def _kept(names: list[list[bool]] | None, start: int, stop: int, lengths: torch.Tensor,
          device: torch.device) -> torch.Tensor:
    """Which real tokens of texts `start:stop` (`lengths` real tokens each, in order) are counted."""
    if names is None:
        return torch.ones(int(lengths.sum()), dtype=torch.bool, device=device)
    return torch.tensor([k for mask in names[start:stop] for k in mask], dtype=torch.bool, device=device)


def _background_from_inputs(model: torch.nn.Module, texts: Sequence[str], inputs: LayerInputs,
                            batch_size: int, names: list[list[bool]] | None, keep: int = 8192) -> SlotStats:
    """Slot statistics from captured layer inputs: each layer's lookup on them, `batch_size` texts at a time."""
    inputs.check(texts)
    layers = memory_layers(model)
    if any(m.values.weight.any() for m in layers):
        raise ValueError("Captured layer inputs are only valid while every value row is zero (the memory adds "
                         "nothing); this memory has been trained, so pass the texts without `inputs`.")
    bounds = torch.searchsorted(inputs.text, torch.arange(0, inputs.n_texts + batch_size, batch_size,
                                                          device=inputs.text.device))
    counts = {m.layer_index: torch.zeros(m.n_slots, dtype=torch.float64) for m in layers}
    doc_freq = {m.layer_index: torch.zeros(m.n_slots, dtype=torch.float64) for m in layers}
    lengths = torch.bincount(inputs.text.cpu(), minlength=inputs.n_texts)
    counted = _kept(names, 0, inputs.n_texts, lengths, inputs.text.device)
    if len(counted) != len(inputs.text):
        raise ValueError("`inputs` hold other tokens than these texts tokenise to; capture them with "
                         "layer_inputs(model, tokenizer, texts) on the same texts and max_length.")
    for m in layers:
        for chunk, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
            indices, weights = m.address(inputs.x[m.layer_index][lo:hi])
            c = counted[lo:hi]
            _add_texts(counts[m.layer_index], doc_freq[m.layer_index], indices[c], weights[c],
                       inputs.text[lo:hi][c] - chunk * batch_size,
                       min(batch_size, inputs.n_texts - chunk * batch_size))
    sample = torch.randperm(len(inputs.text), generator=torch.Generator().manual_seed(0))[:keep]
    kept = {i: x[sample.to(x.device)].clone() for i, x in inputs.x.items()}
    return SlotStats(counts, doc_freq, inputs.n_texts, int(counted.sum()), kept,
                     "all" if names is None else "names")


def _add_texts(counts: torch.Tensor, doc_freq: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
               text: torch.Tensor, n_texts: int) -> None:
    """Add a chunk of texts to one layer's statistics, from each token's slot reads (tokens, heads, topk) and
    the index of its text within the chunk: soft counts, and how many texts read each slot."""
    n_slots = len(counts)
    flat = (text.view(-1, 1, 1) * n_slots + indices).reshape(-1)
    per_text = torch.bincount(flat, weights.reshape(-1).double(),
                              minlength=n_texts * n_slots).view(n_texts, n_slots).cpu()
    counts += per_text.sum(0)
    doc_freq += (per_text > 0).sum(0)
