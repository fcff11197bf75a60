"""Row-sparse optimizers for value tables: only the rows they are given move, bit for bit; and sparse memory
finetuning as a `torch.optim.Optimizer` that chooses those rows itself."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .losses import predicting
from .memory import ReadGradients
from .retrofit import memory_layers
from .selection import kl_scores, random_scores, select_top, tfidf_scores
from .stats import SlotStats, access_counts


class RowSGD:
    """SGD without momentum on chosen rows (Lin et al.'s choice for sparse memory finetuning)."""

    def __init__(self, tables: list[torch.nn.Parameter], lr: float) -> None:
        self.tables, self.lr = tables, lr

    @torch.no_grad()
    def step(self, rows: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> None:
        """Update `tables[j][rows[j]]` from their gradients (`grads[j]`, else the tables' `.grad` rows); every other
        row stays exactly as it was."""
        for table, r, g in zip(self.tables, rows, grads or [t.grad[r] for t, r in zip(self.tables, rows)]):
            if len(r):
                table[r] -= self.lr * g


class RowAdam:
    """Adam(W) with per-row state and per-row step counts, kept only for rows that were ever selected.

    A masked `torch.optim.Adam` is not sparse: momentum keeps moving a row after it is deselected and AdamW's
    weight decay moves every non-zero row. Here a row that is not in `rows` is not touched at all.

    Adam's first step moves every coordinate by about `lr`, however small its gradient, so a row that a batch barely
    reads moves as far as the row that carries the fact. With `layer_scale` the second moment is one running mean
    square per table (over the selected rows' gradients): a row's step is then proportional to its gradient, at most
    `lr` per coordinate.
    """

    def __init__(self, tables: list[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, layer_scale: bool = False) -> None:
        self.tables, self.lr, self.betas, self.eps, self.weight_decay = tables, lr, betas, eps, weight_decay
        self.layer_scale = layer_scale
        self.state = [self._empty(t) for t in tables]

    @staticmethod
    def _empty(table: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"slot_of": torch.full((len(table),), -1, dtype=torch.long, device=table.device),
                "m": table.new_zeros(0, table.shape[1]), "v": table.new_zeros(0, table.shape[1]),
                "steps": table.new_zeros(0), "layer_v": table.new_zeros(()), "layer_steps": table.new_zeros(())}

    def state_rows(self) -> int:
        """How many rows hold optimizer state (the optimizer's memory is this times 2 x row size)."""
        return sum(len(s["steps"]) for s in self.state)

    @torch.no_grad()
    def step(self, rows: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> None:
        """One Adam step on `tables[j][rows[j]]` only, from `grads[j]` (else the tables' `.grad` rows)."""
        b1, b2 = self.betas
        grads = grads or [t.grad[r] for t, r in zip(self.tables, rows)]
        for table, r, g, s in zip(self.tables, rows, grads, self.state):
            if not len(r):
                continue
            new = r[s["slot_of"][r] < 0]
            if len(new):
                s["slot_of"][new] = torch.arange(len(s["steps"]), len(s["steps"]) + len(new), device=r.device)
                s["m"] = torch.cat([s["m"], table.new_zeros(len(new), table.shape[1])])
                s["v"] = torch.cat([s["v"], table.new_zeros(len(new), table.shape[1])])
                s["steps"] = torch.cat([s["steps"], table.new_zeros(len(new))])
            slot = s["slot_of"][r]
            s["steps"][slot] += 1
            m = s["m"][slot].mul_(b1).add_(g, alpha=1 - b1)
            s["m"][slot] = m
            steps = s["steps"][slot].unsqueeze(1)
            if self.layer_scale:  # the per-row second moment is not needed, so it is not kept up to date
                s["layer_v"].mul_(b2).add_(g.pow(2).mean(), alpha=1 - b2)
                s["layer_steps"] += 1
                v = s["layer_v"] / (1 - b2 ** s["layer_steps"])
                update = ((m / (1 - b1**steps)) / (v.sqrt() + self.eps)).clamp_(-1, 1)
            else:
                v = s["v"][slot].mul_(b2).addcmul_(g, g, value=1 - b2)
                s["v"][slot] = v
                update = (m / (1 - b1**steps)) / ((v / (1 - b2**steps)).sqrt() + self.eps)
            if self.weight_decay:
                update += self.weight_decay * table[r]
            table[r] -= self.lr * update


def _distributed() -> bool:
    """Whether torch.distributed runs several processes' training together."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


SCORES = ("kl", "tfidf", "random")
RULES = ("adam", "adam_layer", "sgd")  # row-wise Adam, the same with one second moment per table, plain SGD
WRITE_ON = ("read", "counted")  # a selected row learns from every read of it, or only from reads at counted positions


def slot_scores(score: str, counts: torch.Tensor, background: SlotStats | None, layer: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One layer's slot scores for a batch's counts: "kl" or "tfidf" against `background`, or "random"."""
    if score == "kl":
        return kl_scores(counts, background.counts[layer].to(counts.device))
    if score == "tfidf":
        return tfidf_scores(counts, background.doc_freq[layer].to(counts.device), background.n_batches)
    return random_scores(counts.cpu(), generator).to(counts.device)


class SparseMemoryOptimizer(torch.optim.Optimizer):
    """Sparse memory finetuning as an optimizer: each step updates only the top-t value rows of every memory
    layer, the slots this batch read most surprisingly often compared with background text.

    It counts the slots read by forward passes run with gradients enabled (evaluation under `torch.no_grad` is not
    counted), at the positions whose next token the loss trains: where the `labels` given to the model are not
    -100 (as Hugging Face `Trainer` passes them), else every real token; `count_at(mask)` chooses them for the next
    forward. Counts add up over gradient-accumulation micro-batches until `step()`, and are summed over processes
    (torch.distributed, or `reduce`) so that all select the same rows. Learning-rate schedulers act on `param_groups`
    as usual. The optimizer freezes everything but the value tables and hooks into the model; `detach()` undoes both.
    With `factored=True` (what `train()` uses in one process) the value tables get no dense `.grad`: their gradient
    is kept factored (`ReadGradients`, until `step()`) and only the selected rows are formed, which spares each step
    zero-filling and scattering every table. Gradient clipping and fp16 loss scaling then do not see the tables, so
    it is off by default: a `Trainer` clips gradients and may scale the loss. Across processes it is always off.
    With `write_on="counted"` a selected row learns only from its reads at the counted positions (factored only).
    With `gate_lr > 0` the memory layers' output gates (dense, `dim x value_dim` each) train too, with Adam at that
    rate: beside a locality term they learn where the memory should speak (docs/RESULTS.md); a patch of the value
    rows then no longer fits the reference memory, whose gates differ.

    Example:
        >>> background = prepare_memory(model, tokenizer, load_background()[:300])
        >>> optimizer = SparseMemoryOptimizer(model, background, lr=1.0, top_t=500)
        >>> Trainer(model, args, train_dataset=dataset, optimizers=(optimizer, None)).train()
    """

    def __init__(self, model: torch.nn.Module, background: SlotStats | None, lr: float = 0.3, score: str = "kl",
                 top_t: int = 500, rule: str = "adam", weight_decay: float = 0.0, seed: int = 0,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, factored: bool = False,
                 write_on: str = "read", gate_lr: float = 0.0, row_dropout: float = 0.0) -> None:
        if score not in SCORES or rule not in RULES:
            raise ValueError(f"score must be one of {SCORES} and rule one of {RULES}, got {score!r}, {rule!r}.")
        if gate_lr < 0:
            raise ValueError(f"gate_lr must be a learning rate >= 0, got {gate_lr}.")
        if not 0 <= row_dropout < 1:
            raise ValueError(f"row_dropout must be a probability in [0, 1), got {row_dropout}.")
        if rule == "sgd" and weight_decay:
            raise ValueError("rule='sgd' has no weight decay; use rule='adam' (decoupled, as AdamW) for it.")
        if write_on not in WRITE_ON or (write_on == "counted" and (not factored or reduce is not None)):
            raise ValueError(f"write_on must be one of {WRITE_ON}, got {write_on!r}; 'counted' needs factored=True "
                             "in one process (it masks the factored gradient).")
        self.layers = memory_layers(model)
        if not self.layers:
            raise ValueError("Sparse memory finetuning needs a retrofitted model: call retrofit(model) first.")
        if score != "random" and (background is None or any(m.layer_index not in background.counts
                                                              for m in self.layers)):
            raise ValueError(f"The {score} score needs background statistics of this model's memory layers: "
                             "pass background=collect_background(model, ...) (or prepare_memory's result).")
        tables = [m.values.weight for m in self.layers]
        self._trainable = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for t in tables:
            t.requires_grad_(True)
        gates = [m.gate.weight for m in self.layers] if gate_lr else []
        for g in gates:
            g.requires_grad_(True)
        self.gate_optimizer = torch.optim.Adam(gates, lr=gate_lr) if gates else None
        super().__init__(tables, {"lr": lr, "weight_decay": weight_decay})
        self.rows_optimizer = (RowSGD(tables, lr) if rule == "sgd" else
                               RowAdam(tables, lr, weight_decay=weight_decay, layer_scale=rule == "adam_layer"))
        for table, row_state in zip(tables, getattr(self.rows_optimizer, "state", [])):
            self.state[table] = row_state  # saved and loaded with the optimizer's state_dict
        self.score, self.top_t, self.background, self.reduce = score, top_t, background, reduce
        self.factored, self.write_on = factored, write_on
        self.generator = torch.Generator().manual_seed(seed)
        self.counts: dict[int, torch.Tensor] = {}
        self.last_rows: list[torch.Tensor] = []
        self.selection_seconds = 0.0  # counting slots and choosing rows since the last step
        self.last_selection_seconds = 0.0  # the same for the last step (on a GPU: launch time, not waited for)
        self._chosen: torch.Tensor | None = None
        self._read_gradients = [ReadGradients() for _ in self.layers]
        self._positions: torch.Tensor | None = None
        self._was_recording = [m.recording for m in self.layers]
        for i, m in enumerate(self.layers):
            m.recording = True
            m.row_dropout = (row_dropout, torch.Generator().manual_seed(seed + i)) if row_dropout else None
        self._hooks = [model.register_forward_pre_hook(self._see_batch, with_kwargs=True)]
        self._hooks += [m.register_forward_hook(self._count) for m in self.layers]

    def count_at(self, positions: torch.Tensor) -> None:
        """Count slots at these positions (bool, batch x seq) in the next forward pass."""
        self._chosen = positions.bool()

    def _see_batch(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():  # evaluation is not counted, and leaves a pending count_at for training
            return
        labels, mask = kwargs.get("labels"), kwargs.get("attention_mask")
        if self._chosen is not None:
            self._positions, self._chosen = self._chosen, None
        elif labels is not None:
            self._positions = predicting(labels != -100)
        else:
            self._positions = None if mask is None else mask.bool()
        # Across processes DDP reduces dense gradients, so the tables keep theirs there.
        factored = self.factored and self.reduce is None and not _distributed()
        if self.write_on == "counted" and not factored:
            raise RuntimeError("write_on='counted' masks the factored gradient, which is off across processes.")
        written = self._positions.reshape(-1) if self.write_on == "counted" and self._positions is not None else None
        for m, sink in zip(self.layers, self._read_gradients):
            m.read_gradients, sink.written = (sink if factored else None), written

    def _count(self, memory, args, output) -> None:
        access, memory.last_access = memory.last_access, None
        if access is None or not torch.is_grad_enabled():
            return
        start = time.perf_counter()
        positions = None if self._positions is None else self._positions.to(access.indices.device)
        counts = access_counts(access, memory.n_slots, positions)
        if memory.layer_index in self.counts:
            counts += self.counts[memory.layer_index]
        self.counts[memory.layer_index] = counts
        self.selection_seconds += time.perf_counter() - start

    def scores(self, layer: int, counts: torch.Tensor) -> torch.Tensor:
        """This optimizer's slot scores for one layer's batch counts."""
        return slot_scores(self.score, counts, self.background, layer, self.generator)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Choose the top-t rows per layer from the counted forwards since the last step (never a row the memory has
        locked, see `lock_patch`) and update only them."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if len(self.counts) != len(self.layers):
            raise RuntimeError("SparseMemoryOptimizer.step() saw no forward pass since the last step: run the model "
                               "with gradients enabled and call backward() before step().")
        start = time.perf_counter()
        rows = []
        for m in self.layers:
            scores = self.scores(m.layer_index, self._summed(self.counts[m.layer_index]))
            if m.locked is not None:
                scores = scores.masked_fill(m.locked.to(scores.device), -torch.inf)
            rows.append(select_top(scores, self.top_t))
        self.selection_seconds += time.perf_counter() - start
        group = self.param_groups[0]
        self.rows_optimizer.lr = group["lr"]
        if isinstance(self.rows_optimizer, RowAdam):
            self.rows_optimizer.weight_decay = group["weight_decay"]
        self.rows_optimizer.step(rows, [self._gradient(m, sink, r)
                                        for m, sink, r in zip(self.layers, self._read_gradients, rows)])
        for sink in self._read_gradients:
            sink.clear()
        if self.gate_optimizer is not None:
            self.gate_optimizer.step()
        self.last_rows, self.counts = rows, {}
        self.last_selection_seconds, self.selection_seconds = self.selection_seconds, 0.0
        return loss

    @staticmethod
    def _gradient(memory: torch.nn.Module, sink: ReadGradients, rows: torch.Tensor) -> torch.Tensor:
        """The gradient of one table's `rows`: formed from the kept reads, plus the dense `.grad` if there is one."""
        grad, dense = sink.rows(rows), memory.values.weight.grad
        if dense is not None:
            grad = dense[rows] if grad is None else grad + dense[rows]
        if grad is None:
            raise RuntimeError("SparseMemoryOptimizer.step() found no gradient: call backward() before step().")
        return grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the tables' gradients, dense or kept in factored form, and the gates'."""
        for sink in self._read_gradients:
            sink.clear()
        if self.gate_optimizer is not None:
            self.gate_optimizer.zero_grad(set_to_none)
        super().zero_grad(set_to_none)

    def _summed(self, counts: torch.Tensor) -> torch.Tensor:
        """This process's counts summed over all processes, so that every process selects the same rows."""
        if self.reduce is not None:
            return self.reduce(counts)
        if _distributed():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        return counts

    def state_dict(self) -> dict:
        """The state to save: row moments, and the gates' Adam state when they train."""
        state = super().state_dict()
        if self.gate_optimizer is not None:
            state["gates"] = self.gate_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a saved state (row moments included, and the gates' when they train)."""
        state_dict = dict(state_dict)
        gates = state_dict.pop("gates", None)
        if (gates is None) != (self.gate_optimizer is None):
            raise ValueError("This state was saved with gate_lr " + ("0" if gates is None else "> 0") + " and this "
                             "optimizer has the other: create it with the gate_lr the state was saved with.")
        if gates is not None:
            self.gate_optimizer.load_state_dict(gates)
        super().load_state_dict(state_dict)  # casts every state tensor to its parameter's dtype, indices too
        if isinstance(self.rows_optimizer, RowAdam):
            for i, table in enumerate(self.rows_optimizer.tables):
                self.state[table]["slot_of"] = state_dict["state"][i]["slot_of"].to(table.device, torch.long)
            self.rows_optimizer.state = [self.state[t] for t in self.rows_optimizer.tables]

    def detach(self) -> None:
        """Remove the hooks from the model; restore the memory layers' recording flags and which parameters
        required gradients."""
        for hook in self._hooks:
            hook.remove()
        for m, was in zip(self.layers, self._was_recording):
            m.recording, m.last_access, m.read_gradients, m.row_dropout = was, None, None, None
        for p, trainable in self._trainable:
            p.requires_grad_(trainable)
        self._hooks, self._trainable = [], []
