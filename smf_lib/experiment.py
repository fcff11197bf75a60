"""The end-to-end comparison behind `python -m smf_lib run`: learning vs forgetting, side by side, at matched
learning, on the test split (DESIGN.md §8)."""

from __future__ import annotations

import copy
import itertools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .analysis import parameter_changes
from .augment import augment as augment_facts
from .batches import build_examples
from .data import Fact, KnownFact, load_background, load_facts, load_heldout_text, load_known_facts
from .evaluation import (
    TextScores,
    answer_nll,
    bootstrap_interval,
    complete,
    contains_answer,
    fact_recall,
    heldout_scores,
    hit_rate,
    known_correct,
    score_texts,
)
from .gates import fit_gates, practice_facts
from .healing import HealConfig, heal
from .models import default_device, load_base_model
from .pipeline import prepare_memory
from .profiles import Profile, get_profile
from .report import at_matched_recall, combine_seeds, write_results
from .retrofit import MemoryConfig, memory_layers, retrofit
from .stats import SlotStats, collect_background
from .timing import peak_memory_mb, reset_peak_memory
from .training import METHODS, train

DEFAULT_METHODS = ("smf_kl", "smf_tfidf", "full_ft", "lora")
# A known fact is firmly known when the base model's answer loss is at most this (nats per answer token, a mean
# token probability of 0.37 or more); the others are near ties, which any small change of the model can flip.
FIRM_ANSWER_NLL = 1.0


@dataclass
class Setup:
    """The shared starting point: the retrofitted model, one split's facts and known facts, and its own scores."""

    profile: Profile
    split: str
    model: torch.nn.Module
    tokenizer: object
    facts: list[Fact]
    known: list[KnownFact]  # the split's known facts that the retrofitted model answers: the ones it can forget
    heldout: list[str]
    background: SlotStats
    base: dict
    base_texts: TextScores
    retrofit_info: dict
    heal: dict | None = None  # what healing did (replace mode only)
    base_known_nll: torch.Tensor | None = None  # each known fact's answer loss before training
    unknown: list[KnownFact] = field(default_factory=list)  # the split's known facts it does not answer: gains
    text_states: list = field(default_factory=list)  # held-out text's states at the first memory block, once


def split_facts(profile: Profile, split: str, facts_path: str | Path | None = None) -> list[Fact]:
    """The facts a split trains on: a user's file (all test), else the bundled split cut to the profile's size."""
    if facts_path is not None:
        if split != "test":
            raise ValueError("A facts file is all test facts: tune on the bundled tune split instead.")
        return load_facts(facts_path)
    limit = profile.run.n_facts if split == "test" else profile.run.tune_facts
    return load_facts(split=split)[:limit]


def perplexity_texts(profile: Profile, split: str) -> list[str]:
    """The text perplexity and KL are measured on: the held-out paragraphs for the test split; for tuning, the
    last background passages instead, so that no choice is made on the text that is reported."""
    if split == "test":
        return load_heldout_text()[: profile.run.n_heldout]
    return load_background()[-(profile.run.n_heldout or 40):]


def prepare(profile: str | Profile | None = None, split: str = "test", facts_path: str | Path | None = None,
            seed: int = 0, memory: MemoryConfig | None = None, augment: int = 0, progress: bool = True,
            full_base: bool = True) -> Setup:
    """Retrofit the profile's model, calibrate it, count background slot use, and score it on one split.

    `memory` replaces the profile's memory configuration (its seed is set to `seed`); `augment` adds that many
    wordings (augment.py) to each fact's training sentences. Step 0 is scored on the retrofitted model: the base
    model's function in additive mode, the healed memory's in replace mode (`Setup.heal`: what healing cost);
    without `full_base`, as at a checkpoint (one held-out prompt per fact; no neighbours, gains or KL).
    """
    profile = get_profile(profile)
    model, tokenizer = load_base_model(profile.model, seed=seed)
    given = split_facts(profile, split, facts_path)
    build_examples(given, tokenizer, profile.train.max_length)  # a sentence too long fails now, not after minutes
    if not augment and not any("?" in s for f in given for s in f.train):
        warnings.warn("Every training sentence is a statement: trained on statements alone, the memory answers "
                      "almost no question about them (0.00 of held-out questions on 30 such facts, 0.43 with "
                      "--augment 8; docs/RESULTS.md). Add wordings with --augment N.", stacklevel=2)
    model.to(default_device())
    probe = tokenizer(load_heldout_text()[:4], return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        base_logits = model(**probe).logits
    config = replace(memory or profile.memory, seed=seed)
    heldout = perplexity_texts(profile, split)
    texts = load_background()[: profile.run.n_background]
    known_all = load_known_facts(split=split)[: profile.run.n_known]
    background_on, heal_info = profile.train.background_on, None
    if config.mode == "replace":
        background, heal_info = _retrofit_and_heal(model, tokenizer, texts, heldout, known_all, config,
                                                   replace(profile.heal, seed=seed), progress, background_on)
    else:
        practice = practice_facts(given) if config.query_rank or config.fit_gates else []
        background = prepare_memory(model, tokenizer, texts, config, progress, background_on, practice=practice)
    fitted = config.fit_gates and fit_gates(model, tokenizer, practice, background, config.fit_gates, profile.train,
                                            progress)
    with torch.no_grad():
        diff = (model(**probe).logits - base_logits).abs().max().item()
    layers = memory_layers(model)
    retrofit_info = {"mode": config.mode, "augment": augment, "layers": [m.layer_index for m in layers],
                     "slots_per_layer": layers[0].n_slots, "max_abs_logit_diff": diff,
                     "memory_params": sum(p.numel() for m in layers for p in m.parameters()),
                     **({"fit_gates": fitted} if fitted else {})}
    facts = augment_facts(given, augment, model, tokenizer, seed)
    setup = Setup(profile, split, model, tokenizer, facts, known_all, heldout, background, {}, None, retrofit_info)
    step0, known_ok, known_nll, setup.base_texts, _ = _scores(setup, model, full=full_base)
    setup.known = [k for k, ok in zip(known_all, known_ok) if ok]
    setup.unknown = [k for k, ok in zip(known_all, known_ok) if not ok]
    setup.base_known_nll = known_nll[torch.tensor(known_ok, dtype=torch.bool)]
    setup.base = {"paraphrase_recall_sampled": step0["paraphrase_recall"], **step0,  # full scores sample their own
                  "known_answer_nll": _share(setup.base_known_nll.tolist()),
                  "heldout_ppl": setup.base_texts.perplexity, "known_fact_acc": sum(known_ok) / max(len(known_ok), 1),
                  "known_facts_total": len(known_all), "known_facts_kept_by_base": len(setup.known),
                  "known_facts_firm": int((setup.base_known_nll <= FIRM_ANSWER_NLL).sum())}
    return replace(setup, heal=heal_info)


def _retrofit_and_heal(model: torch.nn.Module, tokenizer, texts: Sequence[str], heldout: Sequence[str],
                       known: Sequence[KnownFact], config: MemoryConfig, healing: HealConfig,
                       progress: bool, background_on: str) -> tuple[SlotStats, dict]:
    """Replace the MLPs by memory, heal it on `texts` (never on the perplexity text), then count background slot
    use on the healed model. The record holds perplexity and known-fact accuracy of the base model, and before and
    after healing: what healing does not restore is forgotten before any fact is taught."""
    def known_acc() -> float:
        return sum(known_correct(model, tokenizer, known)) / max(len(known), 1)

    record = {"ppl_base": score_texts(model, tokenizer, heldout).perplexity, "known_fact_acc_base": known_acc()}
    retrofit(model, config)
    record["ppl_before"] = score_texts(model, tokenizer, heldout).perplexity
    measured = set(heldout)
    result = heal(model, tokenizer, [t for t in texts if t not in measured], healing, progress)
    record.update(ppl_after=score_texts(model, tokenizer, heldout).perplexity, known_fact_acc_after=known_acc(),
                  **result.as_dict())
    return collect_background(model, tokenizer, texts, progress=progress, positions=background_on), record


def _scores(setup: Setup, model: torch.nn.Module, full: bool, graded: bool = True) -> tuple:
    """One generation over probes, held-out prompts, neighbours and known facts, the known answers' losses (unless
    not `graded`), and one pass over held-out text; last, whether each fact's probe gave its answer.

    At checkpoints (`full=False`) each fact contributes one held-out prompt, its formats taken in turn across facts
    (a stratified quarter of them, so a checkpoint costs less), and neither neighbours nor the KL are measured.
    """
    facts, tok = setup.facts, setup.tokenizer
    heldout = [(q, f.answer) for i, f in enumerate(facts)
               for j, q in enumerate(f.heldout) if full or j == i % len(f.heldout)]
    neighbours = [n for f in facts for n in f.neighbours] if full else []
    unknown = setup.unknown if full else []
    prompts = [f.probe for f in facts] + [q for q, _ in heldout] + neighbours + [k.prompt for k in setup.known]
    done = complete(model, tok, prompts + [k.prompt for k in unknown])
    done, missed = done[: len(prompts)], done[len(prompts):]  # the known facts the base model did not answer
    probes, done = done[: len(facts)], done[len(facts):]
    questions, unchanged = done[: len(heldout)], done[len(heldout):]  # neighbours, then known facts
    known_ok = [contains_answer(c, k.answers()) for c, k in zip(unchanged[len(neighbours):], setup.known)]
    trained = [f.answer for f in facts]
    hits = [contains_answer(c, [a]) for c, a in zip(probes, trained)]
    scores = {"fact_recall": _share(hits), "paraphrase_recall": hit_rate(questions, [a for _, a in heldout])}
    known_nll = _known_nll(setup, model) if graded else None
    scores |= {"known_answer_nll": _share(known_nll.tolist())} if graded else {}
    if full:  # neither a neighbour nor a known-fact prompt may now give a trained answer
        starts = itertools.accumulate((len(f.heldout) for f in facts), initial=0)
        sampled = [start + i % len(f.heldout) for i, (start, f) in enumerate(zip(starts, facts))]  # as at checkpoints
        scores["paraphrase_recall_sampled"] = _share(contains_answer(questions[j], [heldout[j][1]]) for j in sampled)
        scores["answer_bleed_pct"] = 100 * _share(contains_answer(c, trained) for c in unchanged)
        scores["paraphrase_by_format"] = _by_format(facts, questions)
        gained = sum(contains_answer(c, k.answers()) for c, k in zip(missed, unknown))
        # Near ties flip both ways under any change: gains beside losses, in units of the facts the base answers.
        scores["known_fact_gain_pct"] = 100 * gained / max(len(setup.known), 1)
    texts = heldout_scores(model, setup.model, tok, setup.heldout, setup.text_states, full and model != setup.model)
    return scores, known_ok, known_nll, texts, hits


def _known_nll(setup: Setup, model: torch.nn.Module) -> torch.Tensor:
    """Each known fact's answer loss: forgetting graded, before answers flip."""
    return answer_nll(model, setup.tokenizer, [k.prompt for k in setup.known], [k.answer for k in setup.known])


def _by_format(facts: Sequence[Fact], completions: Sequence[str]) -> dict[str, float]:
    """Held-out recall per prompt format (facts without formats count as "question")."""
    hits: dict[str, list[bool]] = {}
    answers = [(fmt, f.answer) for f in facts
               for fmt in (f.heldout_formats or ("question",) * len(f.heldout))]
    for (fmt, answer), completion in zip(answers, completions):
        hits.setdefault(fmt, []).append(contains_answer(completion, [answer]))
    return {fmt: _share(h) for fmt, h in hits.items()}


def _share(hits) -> float:
    """The mean of `hits` (booleans: the share that hold), 0 when there are none."""
    return sum(h) / len(h) if (h := list(hits)) else 0.0


def evaluate(setup: Setup, model: torch.nn.Module, full: bool = True) -> dict:
    """Learning and forgetting of `model` against the setup's step-0 scores; `full` adds the KL to the base model
    and bootstrap 95% intervals (over held-out texts and over known facts) of the perplexity change and the drop."""
    return score_facts(setup, model, full)[0]


def score_facts(setup: Setup, model: torch.nn.Module, full: bool = True, graded: bool = True) -> tuple[dict, list]:
    """`evaluate`'s scores and whether each fact's probe gave its answer; without `graded`, no known answer's loss
    (`known_answer_nll`, `known_nll_increase`) is measured at a checkpoint, a sixth of its time."""
    graded = graded or full
    scores, known_ok, known_nll, texts, hits = _scores(setup, model, full, graded)
    base = setup.base_texts
    kept = torch.tensor(known_ok, dtype=torch.float64) if known_ok else torch.ones(1, dtype=torch.float64)

    def ppl_change(i: torch.Tensor | slice = slice(None)) -> float:
        return 100 * (float(torch.exp(texts.nll[i].sum() / texts.tokens[i].sum()
                                      - base.nll[i].sum() / base.tokens[i].sum())) - 1)

    result = {**scores, "heldout_ppl": texts.perplexity, "ppl_increase_pct": ppl_change(),
              "known_fact_acc": setup.base["known_fact_acc"] * float(kept.mean()),
              "known_fact_drop_pct": 100 * (1 - float(kept.mean()))}
    if graded:
        result["known_nll_increase"] = scores["known_answer_nll"] - setup.base["known_answer_nll"]
    firm = setup.base_known_nll <= FIRM_ANSWER_NLL
    if known_ok and firm.any():  # the drop among firmly known facts, beside the drop among all
        result["known_fact_drop_firm_pct"] = 100 * (1 - float(kept[firm].mean()))
    if full:
        result["kl_to_base"] = texts.kl_per_token
        result["ppl_increase_ci95"] = bootstrap_interval(ppl_change, len(texts.nll))
        result["known_fact_drop_ci95"] = bootstrap_interval(lambda i: 100 * (1 - float(kept[i].mean())), len(kept))
        result["known_fact_net_pct"] = scores["known_fact_gain_pct"] - result["known_fact_drop_pct"]
        # Are the lost facts' answers much less likely now, or were they answered narrowly before?
        change, lost = known_nll - setup.base_known_nll, torch.tensor([not ok for ok in known_ok], dtype=torch.bool)
        result["known_nll_increase_lost"] = _share(change[lost].tolist()) if lost.any() else None
        result["known_nll_increase_kept"] = _share(change[~lost].tolist())
        result["known_base_nll_lost"] = _share(setup.base_known_nll[lost].tolist()) if lost.any() else None
        result["known_base_nll_kept"] = _share(setup.base_known_nll[~lost].tolist())
    return result, hits


def step_zero(setup: Setup) -> dict:
    """The checkpoint before training: the retrofitted model's own scores."""
    base = setup.base
    return {"step": 0, "fact_recall": base["fact_recall"], "paraphrase_recall": base["paraphrase_recall_sampled"],
            "heldout_ppl": base["heldout_ppl"], "ppl_increase_pct": 0.0, "known_fact_acc": base["known_fact_acc"],
            "known_fact_drop_pct": 0.0, "known_answer_nll": base["known_answer_nll"], "known_nll_increase": 0.0,
            **({"known_fact_drop_firm_pct": 0.0} if base.get("known_facts_firm") else {})}


@dataclass
class MethodRun:
    """One method trained to matched learning: its model, checkpoints (step 0 first) and cost."""

    method: str
    hyper: dict
    model: torch.nn.Module
    checkpoints: list[dict]
    steps: int
    train_seconds: float
    params_trained: int
    peak_mb: float  # peak memory while training (the process's peak resident set, or the CUDA allocator's)


def train_method(setup: Setup, method: str, hyper: dict, max_steps: int | None = None,
                 eval_every: int | None = None, target: float | None = None, seed: int = 0,
                 progress: bool = True, recall_only: bool = False,
                 arrange: Callable[[torch.nn.Module, bool], None] | None = None) -> MethodRun:
    """Train a copy of the setup's model with `hyper` (TrainConfig fields, e.g. lr, loss_on) until fact recall
    reaches `target` or `max_steps` run out.

    Learning and forgetting are measured every `eval_every` steps, twice as often once recall is within 0.3 of
    the target, so that the figures at matched recall are interpolated between close checkpoints; with
    `recall_only` a checkpoint measures fact recall alone (enough to stop at the target, and far cheaper).
    `arrange(model, training)`, if given, sets the model up before every step (`training=True`) and before every
    checkpoint, the last included (`False`). Evaluation time is not counted in `train_seconds`. On a GPU the
    setup's model, needed again only for the final scores' KL, waits in host memory meanwhile."""
    sizes = setup.profile.run
    max_steps, eval_every = max_steps or sizes.max_steps, eval_every or sizes.eval_every
    target = sizes.target_recall if target is None else target
    eval_seconds, next_eval, peak, device = 0.0, eval_every, 0.0, default_device()

    def checkpoint(step: int, model: torch.nn.Module) -> dict | None:
        nonlocal eval_seconds, next_eval, peak
        if step < next_eval and step != max_steps:
            arrange(model, True)
            return None
        arrange(model, False)
        peak = max(peak, peak_memory_mb(device))  # training's peak so far; evaluation's own is not counted
        start = time.perf_counter()
        scores = ({"fact_recall": fact_recall(model, setup.tokenizer, setup.facts)} if recall_only
                  else evaluate(setup, model, full=False))
        eval_seconds += time.perf_counter() - start
        next_eval = step + (max(eval_every // 2, 1) if scores["fact_recall"] >= target - 0.3 else eval_every)
        reset_peak_memory(device)
        if scores["fact_recall"] < target and step != max_steps:
            arrange(model, True)
        return {**scores, "stop": scores["fact_recall"] >= target}

    config = replace(setup.profile.train, **{"method": method, "steps": max_steps, "seed": seed, "lr": None, **hyper})
    background = setup.background
    if config.background_on != background.positions:  # counted anew, on the model before any training
        texts = load_background()[: setup.profile.run.n_background]
        background = collect_background(setup.model, setup.tokenizer, texts, progress=False,
                                        positions=config.background_on)
    reset_peak_memory(device)
    start = time.perf_counter()
    home = next(setup.model.parameters()).device
    model = copy.deepcopy(setup.model.to("cpu")).to(home)  # never two copies on the GPU
    arrange = arrange or (lambda model, training: None)
    arrange(model, True)
    try:
        model, history = train(model, setup.tokenizer, setup.facts, config, background=background,
                               callback=checkpoint, progress=progress)
    finally:
        setup.model.to(home)
    seconds = time.perf_counter() - start - eval_seconds
    return MethodRun(method, {**hyper, "lr": config.lr}, model, [step_zero(setup), *history.checkpoints],
                     len(history.loss), seconds, history.params_trained, max(peak, peak_memory_mb(device)))


def method_summary(setup: Setup, run: MethodRun) -> dict:
    """The `summary["methods"]` entry of a run: final learning and forgetting, at matched recall, and cost."""
    final = evaluate(setup, run.model)
    target = setup.profile.run.target_recall
    return {**final, "lr": run.hyper["lr"], "hyper": run.hyper,
            "at_matched_recall": at_matched_recall(run.checkpoints, target), "params_trained": run.params_trained,
            "target_reached": any(c["fact_recall"] >= target for c in run.checkpoints),
            "params_changed": sum(r["changed"] for r in parameter_changes(setup.model, run.model)),
            "steps": run.steps, "train_seconds": run.train_seconds, "peak_rss_mb": run.peak_mb}


def new_summary(setup: Setup, seed: int = 0) -> dict:
    """The summary of a run on `setup` before any method is added (the result-file contract's top level)."""
    return {"profile": setup.profile.name, "model": setup.profile.model, "seed": seed, "seeds": [seed],
            "n_facts": len(setup.facts), "split": {"test_fact_ids": [f.id for f in setup.facts],
                                                   "test_known": len(setup.known)},
            "retrofit": setup.retrofit_info, "base": setup.base, "methods": {}, "checkpoints": {},
            "target_recall": setup.profile.run.target_recall, **({"heal": setup.heal} if setup.heal else {})}


def run_method(summary: dict, setup: Setup, method: str, hyper: dict, seed: int, progress: bool = True) -> None:
    """Train one method, score it and put it into `summary`."""
    run = train_method(setup, method, hyper, seed=seed, progress=progress)
    summary["methods"][method] = method_summary(setup, run)
    summary["checkpoints"][method] = run.checkpoints


def compare_methods(setup: Setup, hypers: dict[str, dict], seed: int = 0, progress: bool = True) -> dict:
    """Train each method of `hypers` (method -> TrainConfig fields) on `setup` and return a run-shaped summary."""
    summary = new_summary(setup, seed)
    for method, hyper in hypers.items():
        run_method(summary, setup, method, hyper, seed, progress)
    return summary


def run_experiment(profile: str | Profile | None, hypers: dict[str, dict], facts_path: str | Path | None = None,
                   out: str | Path | None = None, seeds: Sequence[int] = (0,), tuning: dict | None = None,
                   augment: int | None = None, mode: str | None = None, progress: bool = True) -> dict:
    """Train every method of `hypers` (method -> TrainConfig fields) on the test facts, once per seed; write the
    results into `out` after every method and return the summary. `tuning` (from `tuning.tuned_settings`) says
    where the settings came from and which tune facts chose them; `augment` (default: the profile's) adds that
    many model-written wordings to each fact's training sentences; `mode` (default: the profile's) puts the memory
    beside the MLPs or in their place."""
    if not hypers:
        raise ValueError(f"No methods to run: give at least one of {', '.join(METHODS)}.")
    if unknown := [m for m in hypers if m not in METHODS]:
        raise ValueError(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    profile, started = get_profile(profile), time.perf_counter()
    augment = profile.run.augment if augment is None else augment
    out = Path(out or Path("results") / profile.name)
    runs, memory = [], replace(profile.memory, mode=mode or profile.memory.mode)
    for seed in seeds:
        setup = prepare(profile, "test", facts_path, seed, memory, augment, progress)
        runs.append(new_summary(setup, seed))
        for method, hyper in hypers.items():
            run_method(runs[-1], setup, method, hyper, seed, progress)
            summary = {**combine_seeds(runs), "total_seconds": time.perf_counter() - started}
            summary["hyperparameters_from"] = (tuning or {}).get("source", "given")
            summary["split"].update({k: (tuning or {}).get(k) for k in ("tune_fact_ids", "tune_known")})
            write_results(summary, out)  # after every method: a long run that is stopped keeps what it finished
        del setup
    return summary
