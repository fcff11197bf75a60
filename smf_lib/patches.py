"""Memory patches: the value rows one training changed, as a small file that can be applied, reverted and merged.

Sparse memory finetuning changes a few thousand value rows and nothing else, so a fact set is an installable,
removable unit: `save_patch` keeps the changed rows with their indices, the rows they replaced (only the non-zero
ones: a fresh memory's rows are zero) and a fingerprint of the memory's addressing (queries, keys, gate, projection),
since value rows mean something only to the addressing that reads them. `quantize_patch` (or
`save_patch(..., precision="int8")`) stores each row's change as int8 codes and one scale: a quarter of the bytes.

Example:
    >>> reference = copy.deepcopy(model)              # the memory before training
    >>> model, _ = train(model, tokenizer, facts, TrainConfig(), background=background)
    >>> save_patch(model, reference, "facts.patch.safetensors")
    >>> apply_patch(other_copy_of_reference, load_patch("facts.patch.safetensors"))
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .files import save_tensors
from .retrofit import memory_layers


class PatchError(ValueError):
    """A patch that does not fit this memory, or patches that collide."""


PATCH_PRECISIONS = ("fp32", "int8")


@dataclass
class MemoryPatch:
    """Per memory layer: the indices of the changed rows, their new values, and the rows they replaced; an int8
    patch also keeps the codes and per-row scales its values were decoded from (values = before + codes * scale)."""

    rows: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    before: dict[int, torch.Tensor]
    addressing: str  # fingerprint of the memory's parameters other than the values
    codes: dict[int, torch.Tensor] | None = None
    scales: dict[int, torch.Tensor] | None = None

    @property
    def n_rows(self) -> int:
        """How many value rows the patch changes, over all layers."""
        return sum(len(r) for r in self.rows.values())


def addressing_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every memory parameter except the value tables: what decides which slot a context reads."""
    digest = hashlib.sha256()
    for m in memory_layers(model):
        for name, p in sorted(m.named_parameters()):
            if name != "values.weight":
                digest.update(f"{m.layer_index}.{name}{tuple(p.shape)}".encode())
                digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _tables(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    tables = {m.layer_index: m.values.weight for m in memory_layers(model)}
    if not tables:
        raise PatchError("This model has no memory layers: retrofit it (or load its memory) first.")
    return tables


def make_patch(model: torch.nn.Module, reference: torch.nn.Module) -> MemoryPatch:
    """The value rows in which `model` differs from `reference`, a model with the same memory before training."""
    if addressing_fingerprint(model) != addressing_fingerprint(reference):
        raise PatchError("The two models' memories address slots differently (queries, keys, gate or projection "
                         "differ): a patch holds value rows only, so both must come from the same retrofit, trained "
                         "with frozen gates (TrainConfig(gate_lr=0); gates fitted before training, "
                         "MemoryConfig(fit_gates=N), are part of the reference).")
    new, old = _tables(model), _tables(reference)
    if {i: t.shape for i, t in new.items()} != {i: t.shape for i, t in old.items()}:
        raise PatchError("The two models' memories have different layers or sizes.")
    rows = {i: (new[i] != old[i]).any(dim=1).nonzero().flatten().cpu() for i in new}
    return MemoryPatch(rows, {i: new[i].detach()[r].cpu().clone() for i, r in rows.items()},
                       {i: old[i].detach()[r].cpu().clone() for i, r in rows.items()}, addressing_fingerprint(model))


def quantize_patch(patch: MemoryPatch) -> MemoryPatch:
    """The patch with each row's change coded in int8 and one float scale per row: a quarter of the bytes.

    The scale maps a row's largest change to ±127, so every new value lies within half a step (scale / 2) of the
    trained one; the rows replaced are kept exactly, so reverting stays bit for bit. Lossy: measure what it costs
    (docs/RESULTS.md, "Patches in int8").
    """
    codes, scales, values = {}, {}, {}
    for i, before in patch.before.items():
        change = patch.values[i].float() - before.float()
        scales[i] = change.abs().amax(dim=1).div(127).clamp_min(torch.finfo(torch.float32).tiny)
        codes[i] = change.div(scales[i][:, None]).round().clamp(-127, 127).to(torch.int8)
        values[i] = _decode(before, codes[i], scales[i]).to(patch.values[i].dtype)
    return MemoryPatch(patch.rows, values, patch.before, patch.addressing, codes, scales)


def check_precision(precision: str) -> None:
    """Refuse a patch precision other than "fp32" or "int8"."""
    if precision not in PATCH_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PATCH_PRECISIONS)}, got {precision!r}.")


def _decode(before: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return before.float() + codes.float() * scales[:, None]


def save_patch(model: torch.nn.Module, reference: torch.nn.Module, path: str | Path,
               precision: str = "fp32") -> MemoryPatch:
    """Write the rows `model` changed against `reference` to a safetensors file (atomically); return the patch as
    written. `precision="int8"` stores each row's change in int8 (`quantize_patch`); "fp32" stores it exactly."""
    check_precision(precision)
    patch = make_patch(model, reference)
    if precision == "int8":
        patch = quantize_patch(patch)
    write_patch(patch, path)
    return patch


def write_patch(patch: MemoryPatch, path: str | Path) -> Path:
    """Write a patch to a safetensors file, atomically; replaced rows that were all zero are not stored, and an
    int8 patch stores its codes and scales instead of its values."""
    tensors = {}
    for i, rows in patch.rows.items():
        kept = patch.before[i].ne(0).any(dim=1)
        new = ({f"codes.{i}": patch.codes[i], f"scales.{i}": patch.scales[i]} if patch.codes is not None
               else {f"values.{i}": patch.values[i]})
        tensors |= {f"rows.{i}": rows, **new, f"before_rows.{i}": rows[kept], f"before.{i}": patch.before[i][kept]}
    meta = {"addressing": patch.addressing, "layers": json.dumps(sorted(patch.rows)),
            "dims": json.dumps({i: v.shape[1] for i, v in patch.values.items()}),
            "precision": "int8" if patch.codes is not None else "fp32"}
    return save_tensors(tensors, path, meta)


def load_patch(path: str | Path) -> MemoryPatch:
    """Read a patch written by `save_patch` (fp32 or int8)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors, layers, dims = load_file(str(path)), json.loads(meta["layers"]), json.loads(meta["dims"])
        coded = meta.get("precision") == "int8"
        patch = MemoryPatch({}, {}, {}, meta["addressing"], *(({}, {}) if coded else (None, None)))
        for i in layers:
            rows = patch.rows[i] = tensors[f"rows.{i}"]
            before = patch.before[i] = torch.zeros(len(rows), dims[str(i)], dtype=tensors[f"before.{i}"].dtype)
            before[torch.isin(rows, tensors[f"before_rows.{i}"])] = tensors[f"before.{i}"]
            if coded:
                patch.codes[i], patch.scales[i] = tensors[f"codes.{i}"], tensors[f"scales.{i}"]
                patch.values[i] = _decode(before, patch.codes[i], patch.scales[i]).to(before.dtype)
            else:
                patch.values[i] = tensors[f"values.{i}"]
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as error:
        raise PatchError(f"{path} is not a memory patch written by save_patch ({error}).") from None
    return patch


def _check(model: torch.nn.Module, patch: MemoryPatch, expected: dict[int, torch.Tensor], what: str) -> dict:
    tables = _tables(model)
    if set(patch.rows) - set(tables) or any(tables[i].shape[1] != patch.values[i].shape[1] for i in patch.rows):
        raise PatchError(f"This patch is for memory layers {sorted(patch.rows)} of width "
                         f"{[v.shape[1] for v in patch.values.values()]}; this model's memory is layers "
                         f"{sorted(tables)} of width {[t.shape[1] for t in tables.values()]}.")
    if addressing_fingerprint(model) != patch.addressing:
        raise PatchError("This patch was made for a memory that addresses slots differently (another retrofit, "
                         "seed or calibration): its rows would be read by the wrong contexts.")
    for i, rows in patch.rows.items():
        current = tables[i].detach()[rows.to(tables[i].device)].cpu()
        moved = (current != expected[i]).any(dim=1)
        if moved.any():
            raise PatchError(f"Cannot {what}: {int(moved.sum())} of its {len(rows)} rows in layer {i} are not the "
                             "rows it expects (another patch or training changed them). Revert that first, or "
                             "merge the patches with merge_patches.")
    return tables


@torch.no_grad()
def _swap(model: torch.nn.Module, patch: MemoryPatch, old: dict, new: dict, what: str,
          check: bool) -> torch.nn.Module:
    """Check that the patch's rows hold `old` (unless told not to), then write `new` into them."""
    tables = _check(model, patch, old, what) if check else _tables(model)
    for i, rows in patch.rows.items():
        tables[i][rows.to(tables[i].device)] = new[i].to(tables[i])
    return model


def apply_patch(model: torch.nn.Module, patch: MemoryPatch, check: bool = True) -> torch.nn.Module:
    """Write the patch's rows into `model`'s memory; its rows must still hold what the patch replaced.

    `check=False` skips the checks (addressing and current rows), for a patch swapped in and out at every step of
    a training that cannot touch its rows (`lock_patch`)."""
    return _swap(model, patch, patch.before, patch.values, "apply this patch", check)


def revert_patch(model: torch.nn.Module, patch: MemoryPatch, check: bool = True) -> torch.nn.Module:
    """Put back the rows the patch replaced, bit for bit; its rows must still hold the patch's values (`check`
    as for `apply_patch`)."""
    return _swap(model, patch, patch.values, patch.before, "revert this patch", check)


def lock_patch(model: torch.nn.Module, patch: MemoryPatch, locked: bool = True) -> torch.nn.Module:
    """Keep sparse training off the patch's rows (or, with `locked=False`, let it choose them again).

    Later training then writes other rows, so a patch installed before it stays intact and can still be reverted
    on its own; the lock is a property of the model in memory, not saved with it.
    """
    layers = {m.layer_index: m for m in memory_layers(model)}
    if missing := set(patch.rows) - set(layers):
        raise PatchError(f"This patch changes memory layers {sorted(missing)}, which this model does not have.")
    for i, rows in patch.rows.items():
        memory = layers[i]
        if memory.locked is None:
            memory.locked = torch.zeros(memory.n_slots, dtype=torch.bool, device=memory.values.weight.device)
        memory.locked[rows.to(memory.locked.device)] = locked
    return model


def merge_patches(first: MemoryPatch, second: MemoryPatch,
                  on_collision: str = "refuse") -> tuple[MemoryPatch, dict[int, torch.Tensor]]:
    """One patch with the rows of both, and the rows both change, per layer.

    Rows changed by both are refused (`on_collision="refuse"`, a PatchError naming how many), or taken from the
    `"first"` or the `"second"` patch, or averaged (`"mean"`). Both must address slots alike; a patch made after
    another was applied merges with `"second"`, and the merged patch then reverts to what the first found.
    The merge is exact, but patches trained apart were never trained against each other: their facts' prompts
    read each other's rows, and the merged memory may answer less of each set than either patch alone
    (docs/RESULTS.md, "Rounds trained apart, then stacked").
    """
    if on_collision not in ("refuse", "first", "second", "mean"):
        raise ValueError(f"on_collision must be 'refuse', 'first', 'second' or 'mean', got {on_collision!r}.")
    if first.addressing != second.addressing:
        raise PatchError("These patches were made for memories that address slots differently.")
    merged, collisions = MemoryPatch({}, {}, {}, first.addressing), {}
    for i in sorted(set(first.rows) | set(second.rows)):
        parts = [(p.rows[i], p.values[i], p.before[i]) for p in (first, second) if i in p.rows]
        rows = torch.cat([r for r, _, _ in parts])
        values, before = torch.cat([v for _, v, _ in parts]), torch.cat([b for _, _, b in parts])
        unique, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
        collisions[i] = unique[counts > 1]
        if len(collisions[i]) and on_collision == "refuse":
            raise PatchError(f"Both patches change {len(collisions[i])} rows of layer {i} (e.g. row "
                             f"{int(collisions[i][0])}): merge with on_collision='first', 'second' or 'mean'.")
        position = torch.arange(len(rows))
        first_at = torch.zeros_like(unique).scatter_reduce_(0, inverse, position, "amin", include_self=False)
        last_at = torch.zeros_like(unique).scatter_reduce_(0, inverse, position, "amax", include_self=False)
        out = values[first_at if on_collision == "first" else last_at]
        if on_collision == "mean":
            out = torch.zeros_like(out).index_add_(0, inverse, values) / counts.unsqueeze(1).to(values.dtype)
        start = before[first_at]  # what the first patch found there
        merged.rows[i], merged.values[i], merged.before[i] = unique, out, start
    return merged, collisions
