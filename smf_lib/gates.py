"""Fitting the memory's output gates once, on practice facts, before any fact of the user's is taught.

The memory's output is `scale · proj(values(topk(x)) ⊙ silu(gate(x)))`: the gate, a dense map of the layer input,
decides where the memory may speak. Trained beside a locality term (`TrainConfig(gate_lr=..., locality=...)`) it
learns to open where new facts' sentences are read and to shut on ordinary text and known facts, which quarters
the forgetting (docs/RESULTS.md, 2026-12-06). Trained with the facts themselves, though, the gates become part of
what a fact set changes, and a patch of value rows cannot carry them. `fit_gates` trains them on *practice* facts,
never the ones to be taught, then puts every value row back: the memory is silent again (its values are zero), its
gates are shaped, and later training keeps them frozen, so every fact set stays a patch of value rows.

Example:
    >>> background = prepare_memory(model, tokenizer, load_background()[:300])
    >>> fit_gates(model, tokenizer, load_facts(split="tune"), background, steps=150)
    >>> model, history = train(model, tokenizer, my_facts, TrainConfig(locality=1.0), background=background)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from .data import Fact, load_facts
from .retrofit import memory_layers
from .stats import SlotStats
from .training import TrainConfig, train

# The rates, weight and loss measured on the tune split (docs/RESULTS.md, 2026-12-06); a weight of 10 learned nothing.
FIT_SETTINGS = {"method": "smf_kl", "lr": 3.0, "gate_lr": 1e-3, "locality": 1.0, "loss_on": "all"}


def fit_gates(model: torch.nn.Module, tokenizer, facts: Sequence[Fact], background: SlotStats, steps: int,
              config: TrainConfig | None = None, progress: bool = True) -> dict:
    """Train the memory's gates (with value rows and a locality term) on practice `facts` for `steps` steps, keep
    the gates in `model` and nothing else; return what was done.

    `config` (e.g. the profile's) supplies the batch size, counting positions and the like; the rates, locality
    weight, loss and method are `FIT_SETTINGS`. The model's function is unchanged: its value rows stay as they were.
    """
    if not memory_layers(model):
        raise ValueError("fit_gates needs a retrofitted model: call prepare_memory(model, ...) first.")
    if not facts or steps < 1:
        raise ValueError(f"fit_gates needs practice facts and steps >= 1, got {len(facts)} facts and {steps} steps.")
    start = time.perf_counter()
    config = replace(config or TrainConfig(), **FIT_SETTINGS, steps=steps)
    practised, history = train(copy.deepcopy(model), tokenizer, facts, config, background=background,
                               progress=progress)
    with torch.no_grad():
        for memory, fitted in zip(memory_layers(model), memory_layers(practised)):
            memory.gate.weight.copy_(fitted.gate.weight)
    return {"facts": len(facts), "steps": steps, **FIT_SETTINGS, "final_loss": history.loss[-1],
            "seconds": time.perf_counter() - start}


def practice_facts(taught: Sequence[Fact]) -> list[Fact]:
    """The bundled tune-split facts that are not among `taught`: the facts gates are fitted on."""
    skip = {(f.id, f.answer) for f in taught}
    practice = [f for f in load_facts(split="tune") if (f.id, f.answer) not in skip]
    if not practice:
        raise ValueError("Every bundled tune-split fact is among the facts to teach: no practice facts are left "
                         "to fit the gates on; set MemoryConfig(fit_gates=0).")
    return practice
