"""Questions asked of a trained model: which parameters and value rows changed, which memory layer learned."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from .memory import ProductKeyMemory
from .retrofit import memory_layers
from .stats import capture_inputs, recording


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name, to compare with after training (`parameter_changes`)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


Before = torch.nn.Module | Mapping[str, torch.Tensor]  # the model before training, or its `snapshot`


def parameters_by_name(before: Before, model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    """The parameters of `before` by name; a clear error when it lacks one of `model`'s."""
    reference = dict(before.named_parameters()) if isinstance(before, torch.nn.Module) else before
    missing = [n for n, _ in model.named_parameters() if n not in reference]
    if missing:
        raise ValueError(f"`before` lacks {len(missing)} parameters of the model (e.g. {missing[0]!r}): pass "
                         "snapshot(model) taken before training, or the untrained model itself.")
    return reference


def parameter_changes(before: Before, model: torch.nn.Module) -> list[dict]:
    """One row per parameter tensor of `model`: its name, size and how many of its entries differ from `before`
    (a model of the same structure, or a `snapshot`; exact comparison, no tolerance), changed tensors first."""
    reference = parameters_by_name(before, model)
    rows = []
    for name, p in model.named_parameters():
        changed = int((p.detach() != reference[name].to(p.device)).sum())
        rows.append({"parameter": name, "entries": p.numel(), "changed": changed})
    return sorted(rows, key=lambda r: (-r["changed"], r["parameter"]))


def _value_tables(before: Before, model: torch.nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per memory layer of `model`: its value table now and in `before`, on the same device."""
    reference, names = parameters_by_name(before, model), {id(p): n for n, p in model.named_parameters()}
    return {m.layer_index: (m.values.weight.detach(),
                            reference[names[id(m.values.weight)]].detach().to(m.values.weight.device))
            for m in memory_layers(model)}


def changed_rows(before: Before, model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Per memory layer, the indices of the value rows that differ from `before` (a model or a `snapshot`)."""
    tables = _value_tables(before, model)
    return {i: (new != old).any(dim=1).nonzero().flatten().cpu() for i, (new, old) in tables.items()}


def row_moves(before: Before, model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Per memory layer, the L2 norm of each value row's change since `before` (a model or a `snapshot`)."""
    tables = _value_tables(before, model)
    return {i: (new.float() - old.float()).norm(dim=1).cpu() for i, (new, old) in tables.items()}


@torch.no_grad()
def layer_attribution(model: torch.nn.Module, untrained: Before,
                      score: Callable[[torch.nn.Module], dict]) -> dict[int, dict]:
    """`score(model)` with one memory layer's trained values at a time, the others reset to `untrained`'s.

    Tells which layer does the learning and which the forgetting: `{layer index: score}`. `model` must be a
    sparse-trained copy of `untrained` (the model before training, or its `snapshot`); it is left as it was.

    Example:
        >>> layer_attribution(run.model, setup.model, lambda m: evaluate(setup, m, full=False))
    """
    tables = _value_tables(untrained, model) if memory_layers(model) else {}
    if not tables:
        raise ValueError("`model` has no memory layers: pass a copy of the untrained model trained with a sparse "
                         "method.")
    trained = {i: now.clone() for i, (now, _) in tables.items()}
    result = {}
    try:
        for kept in tables:
            for i, (now, old) in tables.items():
                now.copy_(trained[i] if i == kept else old)
            result[kept] = score(model)
    finally:
        for i, (now, _) in tables.items():
            now.copy_(trained[i])
    return result


@torch.no_grad()
def trained_read_share(model: torch.nn.Module, untrained: Before, tokenizer,
                       prompts: list[str]) -> list[float]:
    """For each prompt, the share of the memory's read weight at its last token that falls on value rows training
    changed (mean over layers and heads): how much of what the prompt reads was written by training.

    A held-out wording of a trained fact can only recall it through rows it shares with the trained wordings.
    """
    rows = changed_rows(untrained, model)
    enc, last = _encode_for_last_token(model, tokenizer, prompts)
    with recording(model) as layers:
        model(**enc)
        shares = []
        for m in layers:
            access = m.last_access
            idx, w = access.indices[torch.arange(len(prompts)), last], access.weights[torch.arange(len(prompts)), last]
            trained = torch.isin(idx, rows[m.layer_index].to(idx.device))
            shares.append((w * trained).sum((-1, -2)) / w.sum((-1, -2)))
    return torch.stack(shares).mean(0).tolist()


def _encode_for_last_token(model: torch.nn.Module, tokenizer, prompts: list[str]) -> tuple[dict, torch.Tensor]:
    """The prompts as one right-padded batch (positions as in training: no left offset) and each one's last index."""
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    finally:
        tokenizer.padding_side = side
    return enc, enc["attention_mask"].sum(1) - 1


@torch.no_grad()
def gate_openness(model: torch.nn.Module, untrained: Before, tokenizer, prompts: list[str]) -> dict[int, float]:
    """Per memory layer, how open `model`'s output gates are at the prompts' last tokens, relative to `untrained`'s
    gates on the same inputs: mean |silu(gate(x))|, as a ratio (1: unchanged, below 1: shut further).

    Gates trained beside a locality term (`TrainConfig(gate_lr=...)`) learn where the memory may speak; this says
    where, for any kind of prompt: a new fact's questions, known facts, ordinary text.
    """
    names = {m: name for name, m in model.named_modules() if isinstance(m, ProductKeyMemory)}
    reference = parameters_by_name(untrained, model)
    enc, last = _encode_for_last_token(model, tokenizer, prompts)
    with capture_inputs(model) as captured:
        model(**enc)
    ratios = {}
    for m, name in names.items():
        x = captured[m.layer_index][0][torch.arange(len(prompts)), last]
        before = reference[f"{name}.gate.weight"].to(x.device)
        ratios[m.layer_index] = (F.silu(m.gate(x)).abs().mean() / F.silu(x @ before.T).abs().mean()).item()
    return ratios
