"""What the tokens of a sentence or a training batch read in the memory, scored as a training step scores them, and
how far training moved each value row: the computations behind the slot inspector (widgets.py) and notebook 2."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .analysis import Before, parameters_by_name
from .batches import build_examples, collate, counted_positions
from .data import Fact
from .memory import SlotAccess
from .models import pad_id
from .optim import slot_scores
from .plots import token_labels
from .retrofit import memory_layers
from .selection import kl_scores, select_top, token_surprise
from .stats import SlotStats, access_counts, recording, slot_counts
from .training import SCORE_OF, TrainConfig

TOP_T = TrainConfig().top_t
SCORE_NAMES = {"smf_kl": "KL", "smf_tfidf": "TF-IDF"}  # the methods whose selection is a function of the batch alone


@dataclass
class SentenceReads:
    """What one sentence read: token labels and, per memory layer, its slot access and scores.

    The sentence is scored as a batch on its own: `counts` are its soft access counts, `kl` the KL score of each slot,
    `selected` the top-t slots by KL, `surprise` the token surprise (one value per token).
    """

    text: str
    tokens: list[str]
    indices: dict[int, torch.Tensor]   # (seq, heads, topk)
    weights: dict[int, torch.Tensor]   # (seq, heads, topk)
    kl: dict[int, torch.Tensor]        # (n_slots,)
    selected: dict[int, torch.Tensor]  # (n_slots,) bool
    surprise: dict[int, torch.Tensor]  # (seq,)


@torch.no_grad()
def read_sentence(model: torch.nn.Module, tokenizer, background: SlotStats, text: str, top_t: int = TOP_T,
                  batch_with: Sequence[str] = ()) -> SentenceReads:
    """Run `text` through a retrofitted model and score what each of its tokens read (see SentenceReads).

    The batch whose usage `p_b` the scores compare with the background is `text` alone, or `text` together with the
    sentences `batch_with` (e.g. to compare two sentences on one footing). Every position counts; `SlotInspector`
    scores a training batch the way the trainer does instead.
    """
    device = next(model.parameters()).device
    batch = tokenizer([text, *batch_with], return_tensors="pt", padding=True).to(device)
    length = int(batch["attention_mask"][0].sum())
    indices, weights, kl, selected, surprise = {}, {}, {}, {}, {}
    with recording(model) as layers:
        model(**batch)
        counts = slot_counts(model, batch["attention_mask"].bool())
        for m in layers:
            i, c = m.layer_index, counts[m.layer_index].cpu()
            access = SlotAccess(m.last_access.indices[0, :length].cpu(), m.last_access.weights[0, :length].cpu())
            bg = background.counts[i].to(c)
            indices[i], weights[i] = access.indices, access.weights
            kl[i] = kl_scores(c, bg)
            selected[i] = torch.zeros(m.n_slots, dtype=torch.bool)
            selected[i][select_top(kl[i], top_t)] = True
            surprise[i] = token_surprise(access, c, bg)
    tokens = token_labels(tokenizer, batch["input_ids"][0, :length].tolist())
    return SentenceReads(text, tokens, indices, weights, kl, selected, surprise)


@dataclass
class BatchScores:
    """A training batch scored as a `SparseMemoryOptimizer` step scores it, per memory layer (all on the CPU).

    `batch`: the collated batch (`collate`); `positions`: where slot reads are counted (batch x seq); `counts`: the
    soft slot counts there; `scores`: the method's slot scores; `selected`: the top-t rows the step updates, in the
    optimizer's order (as its `last_rows`); `access`: what every token read, (batch, seq, heads, topk).
    """

    batch: dict[str, torch.Tensor]
    positions: torch.Tensor
    counts: dict[int, torch.Tensor]
    scores: dict[int, torch.Tensor]
    selected: dict[int, torch.Tensor]
    access: dict[int, SlotAccess]


@torch.no_grad()
def forward_reads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[int, SlotAccess]:
    """Run a collated batch as `token_loss_sum` does (ids and the boolean mask only); return each layer's reads."""
    with recording(model) as layers:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return {m.layer_index: m.last_access for m in layers}


@torch.no_grad()
def score_batch(model: torch.nn.Module, tokenizer, background: SlotStats, facts: Sequence[Fact],
                config: TrainConfig) -> BatchScores:
    """Score the batch of all training sentences of `facts` as one `train` step with `config` would.

    The same tokenisation and right padding (`build_examples`, `collate`), slot counts at
    `counted_positions(batch, config.count_on)` (`access_counts`, the optimizer's count), the method's scores
    against `background`, and the top-`config.top_t` rows per layer (`select_top`).
    """
    if config.method not in SCORE_NAMES:
        raise ValueError(f"The inspector shows the selection of {' or '.join(SCORE_NAMES)}; "
                         f"config.method is {config.method!r}.")
    examples = build_examples(facts, tokenizer, config.max_length)
    if not examples:
        raise ValueError("The batch has no training sentences: give facts with at least one `train` sentence.")
    batch = collate(examples, pad_id(tokenizer), next(model.parameters()).device)
    positions = counted_positions(batch, config.count_on)
    access = forward_reads(model, batch)
    counts, scores, selected = {}, {}, {}
    for m in memory_layers(model):
        i = m.layer_index
        counts[i] = access_counts(access[i], m.n_slots, positions.to(access[i].indices.device))
        scores[i] = slot_scores(SCORE_OF[config.method], counts[i], background, i).cpu()
        selected[i] = select_top(scores[i], config.top_t)
        counts[i] = counts[i].cpu()
    return BatchScores({k: v.cpu() for k, v in batch.items()}, positions.cpu(), counts, scores, selected,
                       {i: SlotAccess(a.indices.cpu(), a.weights.cpu()) for i, a in access.items()})


@contextmanager
def parameters_of(model: torch.nn.Module, before: Before) -> Iterator[torch.nn.Module]:
    """Inside the block `model` has the parameters of `before` (a model or a `snapshot`); on leaving, its own again.

    Only tensors that differ are swapped, so for a sparse-trained model this copies the value tables alone.
    """
    reference, saved = parameters_by_name(before, model), []
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                old = reference[name].to(p.device)
                if not torch.equal(p, old):
                    saved.append((p, p.detach().clone()))
                    p.copy_(old)
        yield model
    finally:
        with torch.no_grad():
            for p, own in saved:
                p.copy_(own)
