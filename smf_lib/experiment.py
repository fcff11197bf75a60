"""The end-to-end comparison behind `python -m smf_lib run`: learning vs forgetting, side by side."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .analysis import parameter_changes
from .data import (
    Fact,
    KnownFact,
    load_background,
    load_facts,
    load_heldout_text,
    load_known_facts,
)
from .evaluation import (
    fact_recall,
    known_correct,
    paraphrase_recall,
    perplexity,
    recall_and_known,
)
from .models import default_device, load_base_model
from .pipeline import prepare_memory
from .profiles import Profile, get_profile
from .retrofit import MemoryConfig, memory_layers
from .stats import SlotStats
from .timing import peak_memory_mb
from .training import DEFAULT_LR, METHODS, train

DEFAULT_METHODS = ("smf_kl", "smf_tfidf", "full_ft", "lora")


@dataclass
class Setup:
    """The shared starting point: the retrofitted model, its data and baseline scores."""

    profile: Profile
    model: torch.nn.Module
    tokenizer: object
    facts: list[Fact]
    known: list[KnownFact]
    heldout: list[str]
    background: SlotStats
    base: dict
    retrofit_info: dict


def prepare(profile: str | Profile | None = None, facts_path: str | Path | None = None, seed: int = 0,
            memory: MemoryConfig | None = None, progress: bool = True) -> Setup:
    """Load the profile's model, score the base model, then retrofit it, calibrate it and count background slot use.

    `memory` replaces the profile's memory configuration (its seed is set to `seed`).
    """
    profile = get_profile(profile)
    sizes = profile.run
    model, tokenizer = load_base_model(profile.model, seed=seed)
    model.to(default_device())
    facts = load_facts(facts_path, limit=None if facts_path else sizes.n_facts)
    heldout = load_heldout_text()[: sizes.n_heldout]
    known_all = load_known_facts()
    # Only the known facts this base model answers correctly can be forgotten.
    known = [k for k, ok in zip(known_all, known_correct(model, tokenizer, known_all)) if ok]
    with torch.no_grad():
        batch = tokenizer(load_heldout_text()[:4], return_tensors="pt", padding=True).to(model.device)
        base_logits = model(**batch).logits
    base = {"heldout_ppl": perplexity(model, tokenizer, heldout), "known_fact_acc": 1.0 if known else 0.0,
            "fact_recall": fact_recall(model, tokenizer, facts),
            "paraphrase_recall": paraphrase_recall(model, tokenizer, facts),
            "known_facts_total": len(known_all), "known_facts_kept_by_base": len(known)}
    config = replace(memory or profile.memory, seed=seed)
    background = prepare_memory(model, tokenizer, load_background()[: sizes.n_background], config, progress)
    with torch.no_grad():
        diff = (model(**batch).logits - base_logits).abs().max().item()
    layers = memory_layers(model)
    retrofit_info = {"mode": config.mode, "layers": [m.layer_index for m in layers],
                     "slots_per_layer": layers[0].n_slots,
                     "memory_params": sum(p.numel() for m in layers for p in m.parameters()),
                     "max_abs_logit_diff": diff}
    return Setup(profile, model, tokenizer, facts, known, heldout, background, base, retrofit_info)


def evaluate(setup: Setup, model: torch.nn.Module, full: bool = True) -> dict:
    """Learning and forgetting of `model` against the setup's base scores (`full=False`: skip paraphrases)."""
    ppl = perplexity(model, setup.tokenizer, setup.heldout)
    recall, known_ok = recall_and_known(model, setup.tokenizer, setup.facts, setup.known)
    known_acc = sum(known_ok) / max(len(setup.known), 1)
    result = {"fact_recall": recall, "heldout_ppl": ppl,
              "ppl_increase_pct": 100 * (ppl / setup.base["heldout_ppl"] - 1), "known_fact_acc": known_acc,
              "known_fact_drop_pct": 100 * (1 - known_acc) if setup.known else 0.0}
    if full:
        result["paraphrase_recall"] = paraphrase_recall(model, setup.tokenizer, setup.facts)
    return result


@dataclass
class MethodRun:
    """One method trained to matched learning: its model, checkpoints and cost."""

    method: str
    lr: float
    model: torch.nn.Module
    checkpoints: list[dict]
    steps: int
    train_seconds: float
    params_trained: int


def train_method(setup: Setup, method: str, lr: float, facts: Sequence[Fact] | None = None,
                 max_steps: int | None = None, eval_every: int | None = None, target: float | None = None,
                 seed: int = 0, progress: bool = True) -> MethodRun:
    """Train a copy of the setup's model until fact recall reaches `target` or `max_steps` run out.

    Learning and forgetting are measured every `eval_every` steps (the Pareto curve); evaluation time is
    not counted in `train_seconds`.
    """
    sizes = setup.profile.run
    sub = replace(setup, facts=list(facts if facts is not None else setup.facts))
    max_steps, eval_every = max_steps or sizes.max_steps, eval_every or sizes.eval_every
    target = sizes.target_recall if target is None else target
    eval_seconds = 0.0

    def checkpoint(step: int, model: torch.nn.Module) -> dict | None:
        nonlocal eval_seconds
        if step % eval_every and step != max_steps:
            return None
        start = time.perf_counter()
        scores = evaluate(sub, model, full=False)
        eval_seconds += time.perf_counter() - start
        return {**scores, "stop": scores["fact_recall"] >= target}

    config = replace(setup.profile.train, method=method, steps=max_steps, lr=lr, seed=seed)
    start = time.perf_counter()
    model, history = train(copy.deepcopy(setup.model), setup.tokenizer, sub.facts, config,
                           background=setup.background, callback=checkpoint, progress=progress)
    seconds = time.perf_counter() - start - eval_seconds
    return MethodRun(method, lr, model, history.checkpoints, len(history.loss), seconds, history.params_trained)


def sweep_lr(setup: Setup, method: str, seed: int = 0, progress: bool = True) -> tuple[float, list[dict]]:
    """Pick a method's learning rate on a few facts: the best recall, then the least perplexity increase."""
    sizes = setup.profile.run
    grid = sizes.lr_grid.get(method, (DEFAULT_LR[method],))  # one candidate: no sweep
    if len(grid) == 1:
        return grid[0], []
    rows = []
    for lr in grid:
        run = train_method(setup, method, lr, facts=setup.facts[: sizes.sweep_facts], max_steps=sizes.sweep_steps,
                           eval_every=sizes.sweep_steps, target=1.01, seed=seed, progress=progress)
        last = run.checkpoints[-1]
        rows.append({"lr": lr, **{k: last[k] for k in ("fact_recall", "ppl_increase_pct", "known_fact_drop_pct")}})
        del run
    best = max(rows, key=lambda r: (round(r["fact_recall"], 2), -r["ppl_increase_pct"]))
    return best["lr"], rows


def method_summary(setup: Setup, run: MethodRun) -> dict:
    """The `summary["methods"]` entry of a run trained on `setup.facts`: final learning and forgetting, cost."""
    last = run.checkpoints[-1] if run.checkpoints else {}
    if last.get("step") == run.steps:  # the last checkpoint already scored the final model: add paraphrases only
        final = {**last, "paraphrase_recall": paraphrase_recall(run.model, setup.tokenizer, setup.facts)}
    else:
        final = evaluate(setup, run.model)
    keys = ("fact_recall", "paraphrase_recall", "heldout_ppl", "ppl_increase_pct", "known_fact_acc",
            "known_fact_drop_pct")
    return {**{k: final[k] for k in keys}, "params_trained": run.params_trained,
            "params_changed": sum(r["changed"] for r in parameter_changes(setup.model, run.model)),
            "steps": run.steps, "train_seconds": run.train_seconds, "peak_rss_mb": peak_memory_mb(), "lr": run.lr}


def new_summary(setup: Setup, seed: int = 0, target: float | None = None) -> dict:
    """The summary of a run on `setup` before any method is added (the result-file contract's top level)."""
    return {"profile": setup.profile.name, "model": setup.profile.model, "seed": seed, "n_facts": len(setup.facts),
            "retrofit": setup.retrofit_info, "base": setup.base, "methods": {}, "sweeps": {}, "checkpoints": {},
            "target_recall": setup.profile.run.target_recall if target is None else target}


def add_method(summary: dict, setup: Setup, run: MethodRun, sweep: list[dict] | None = None) -> None:
    """Score a trained method on the setup's facts and put it into `summary`."""
    summary["methods"][run.method] = method_summary(setup, run)
    summary["checkpoints"][run.method] = run.checkpoints
    summary["sweeps"][run.method] = sweep or []


def compare_methods(setup: Setup, methods: Sequence[str], lrs: Mapping[str, float], max_steps: int, eval_every: int,
                    target: float, seed: int = 0, progress: bool = True) -> dict:
    """Train each method on `setup.facts` at the given learning rate until recall reaches `target` or `max_steps`
    run out, and return a `run_experiment`-shaped summary: a smaller, sweep-free comparison for notebooks."""
    summary = new_summary(setup, seed, target)
    for method in methods:
        run = train_method(setup, method, lrs[method], max_steps=max_steps, eval_every=eval_every, target=target,
                           seed=seed, progress=progress)
        add_method(summary, setup, run)
        del run  # each trained copy is freed before the next one is made
    return summary


def run_experiment(profile: str | Profile | None = None, methods: Sequence[str] = DEFAULT_METHODS,
                   facts_path: str | Path | None = None, out: str | Path | None = None, seed: int = 0,
                   progress: bool = True) -> dict:
    """Retrofit, collect statistics, train every method to matched learning, evaluate, write the results."""
    from .report import write_results

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    started = time.perf_counter()
    setup = prepare(profile, facts_path, seed, progress=progress)
    out = Path(out or Path("results") / setup.profile.name)
    summary = new_summary(setup, seed)
    for method in methods:
        lr, sweep = sweep_lr(setup, method, seed, progress)
        run = train_method(setup, method, lr, seed=seed, progress=progress)
        add_method(summary, setup, run, sweep)
        del run
        summary["total_seconds"] = time.perf_counter() - started
        write_results(summary, out)  # after every method: a long run that is stopped keeps what it finished
    return summary
