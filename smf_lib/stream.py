"""The continual stream behind `python -m smf_lib stream`: the test facts arrive in rounds, each method learns them
one round after another, and after every round what was learned in every earlier round is measured again
(a retention matrix), with known facts and perplexity (DESIGN.md §8).

Sparse methods also leave one memory patch per round; at the end, the first round's patch is reverted on the final
model ("forgetting on purpose") to show that a round is a removable unit.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Fact, load_facts
from .evaluation import complete, contains_answer
from .experiment import Setup, prepare, score_facts, split_facts, train_method
from .files import save_figure, write_json
from .models import default_device
from .patches import (
    MemoryPatch,
    apply_patch,
    check_precision,
    lock_patch,
    make_patch,
    quantize_patch,
    revert_patch,
    write_patch,
)
from .profiles import Profile, get_profile
from .retrofit import memory_state
from .stream_report import plot_stream
from .training import METHODS, SPARSE_METHODS
from .tuning import tuned_settings

STREAM_METHODS = ("smf_kl", "full_ft", "lora")
# Each earlier round's patch is out at a training step with this probability (`RoundDropout`): chosen on the tune
# split, where reverting round 1 then kept every other round (docs/RESULTS.md, "Round dropout").
ROUND_DROPOUT = 0.5
# Before the rounds, the memory's gates are fitted this many steps on practice facts and then frozen, and sparse
# methods train with a locality term of this weight: chosen on the tune split, where they cut the known facts lost
# after five rounds from 14.2% to 5.3% for held-out recall 0.07 lower (three seeds; docs/RESULTS.md, "Fitted gates
# on three tune seeds").
STREAM_GATES = 150
STREAM_LOCALITY = 1.0
# Training's arithmetic: "auto" takes bf16 where the hardware computes it natively, where a step of full finetuning
# or LoRA takes 0.63-0.65 of fp32's time and one of SMF-KL 0.77 (2026-12-07); scoring stays fp32 either way.
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
BASE_KEYS = ("fact_recall", "paraphrase_recall", "heldout_ppl", "known_fact_acc")


def split_rounds(facts: Sequence[Fact], rounds: int) -> list[list[Fact]]:
    """`rounds` consecutive parts of equal size; the facts left over by the division are not taught."""
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}.")
    if rounds > len(facts):
        raise ValueError(f"{rounds} rounds need at least {rounds} facts, one per round; there are {len(facts)}.")
    size = len(facts) // rounds
    return [list(facts[i * size:(i + 1) * size]) for i in range(rounds)]


def round_recalls(model: torch.nn.Module, tokenizer, parts: Sequence[Sequence[Fact]]) -> list[float]:
    """Fact recall of each part, from one batched generation over all their probes."""
    facts = [f for part in parts for f in part]
    done = complete(model, tokenizer, [f.probe for f in facts])
    return _per_part([contains_answer(c, [f.answer]) for c, f in zip(done, facts)], parts)


def score_rounds(setup: Setup, model: torch.nn.Module, parts: Sequence[Sequence[Fact]]) -> tuple[list[float], dict]:
    """Each part's fact recall and the checkpoint scores (`evaluate(full=False)`) on all parts' facts, from one
    generation; the known answers' losses, which the stream does not report, are not measured."""
    scores, hits = score_facts(replace(setup, facts=[f for part in parts for f in part]), model, full=False,
                               graded=False)
    return _per_part(hits, parts), scores


def _per_part(hits: Sequence[bool], parts: Sequence[Sequence[Fact]]) -> list[float]:
    """The share of `hits` (one per fact, in the parts' order) that hold within each part."""
    ends = list(itertools.accumulate(len(part) for part in parts))
    return [float(np.mean(hits[end - len(part):end])) for part, end in zip(parts, ends)]


def memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of all memory parameters: what `save_memory` writes, the size a patch is set against."""
    return sum(t.numel() * t.element_size() for t in memory_state(model).values())


class RoundDropout:
    """While a round trains, each earlier round's patch is out of the memory at each step with probability `rate`
    (all are in at checkpoints and at the end): the round learns to answer with any earlier round reverted, so
    reverting one takes less from the rounds after it. The earlier rounds' rows must be locked (`lock_patch`)."""

    def __init__(self, patches: Sequence[MemoryPatch], rate: float, seed: int) -> None:
        self.patches, self.rate = list(patches), rate
        self.generator = torch.Generator().manual_seed(seed)
        self.installed = [True] * len(self.patches)

    def __call__(self, model: torch.nn.Module, training: bool) -> None:
        draw = torch.rand(len(self.patches), generator=self.generator) >= self.rate
        wanted = draw.tolist() if training else [True] * len(self.patches)
        for patch, now, want in zip(self.patches, self.installed, wanted):
            if now != want:
                (apply_patch if want else revert_patch)(model, patch, check=False)  # locked: nothing moved them
        self.installed = wanted


@dataclass
class MethodStream:
    """One method taught round after round: the final model, each round's memory patch (sparse methods only) and
    the method's summary entry."""

    model: torch.nn.Module
    patches: list[MemoryPatch]
    entry: dict


def stream_method(setup: Setup, parts: Sequence[Sequence[Fact]], method: str, hyper: dict,
                  patch_dir: str | Path | None = None, seed: int = 0, progress: bool = True,
                  lock: bool = True, independent: bool = False, precision: str = "int8",
                  round_dropout: float | None = None) -> MethodStream:
    """Train `method` on each part in turn, each round from the previous round's model, and score after each.

    A round stops at the profile's target recall on its own facts, checked every third of the profile's
    checkpoint interval; everything else is measured once, after the round. Sparse methods save each round's
    patch (against the memory it trained from) into `patch_dir`, or into a temporary folder when it is None, only
    to measure its size. With `lock` later rounds may not write a round's rows (`lock_patch`): each round's
    facts stay as learned and its patch reverts whole (without it, later rounds rewrote half of round 1's rows and
    round 1 kept a third of its recall; docs/RESULTS.md). With `independent` (sparse methods; needs `lock`) each
    round trains with the earlier rounds' rows taken out, which go back in after it: no round's rows are fitted
    around another's, so reverting one leaves the others as they would be without it, but stacked they interfere
    (docs/RESULTS.md, "Rounds trained apart, then stacked"). With `round_dropout` (sparse methods; needs `lock`)
    each earlier round's patch is out at each training step with that probability (`RoundDropout`; None:
    ROUND_DROPOUT for locked rounds trained in sequence, else 0). Patches are saved in `precision` ("int8", a
    quarter of float32's bytes, or "fp32", exact; `quantize_patch`), and each round continues from the rows saved.
    """
    round_dropout = _check_rounds(lock, independent, precision, round_dropout)
    sparse = method in SPARSE_METHODS
    eval_every = max(setup.profile.run.eval_every // 3, 1)  # checkpoints measure recall only: they can be frequent
    entry: dict = {"hyper": hyper, "retention": [], "known_fact_drop_pct": [], "ppl_increase_pct": [],
                   "paraphrase_recall": [], "steps": [], "train_seconds": []}
    if sparse:
        entry["patch_bytes"], entry["patch_rows"] = [], []
    current, patches = setup.model, []
    set_aside = independent and sparse  # earlier rounds' rows are out of the memory while a round trains
    for j in tqdm(range(len(parts)), desc=f"{method} rounds", disable=not progress):
        for earlier in patches if set_aside else ():
            revert_patch(current, earlier)  # still locked: this round writes other rows
        dropout = RoundDropout(patches, round_dropout, seed + j) if sparse and round_dropout else None
        run = train_method(replace(setup, facts=list(parts[j]), model=current), method, hyper, seed=seed,
                           eval_every=eval_every, progress=progress, recall_only=True, arrange=dropout)
        if sparse:
            patch, size = _round_patch(run.model, current, patch_dir, method, j, precision)
            if lock:
                lock_patch(run.model, patch)
            for earlier in patches if set_aside else ():
                apply_patch(run.model, earlier)
            patches.append(patch)
            entry["patch_bytes"].append(size)
            entry["patch_rows"].append(patch.n_rows)
        current = run.model  # the next round continues from here; the previous model can be freed
        entry["steps"].append(run.steps)
        entry["train_seconds"].append(run.train_seconds)
        _score_round(entry, setup, current, parts[: j + 1])
    return MethodStream(current, patches, entry)


def _check_rounds(lock: bool, independent: bool, precision: str, round_dropout: float | None = None) -> float:
    """The round dropout to use (None: the default for these rounds); refuse independent rounds or round dropout
    without locks, both at once, and an unknown patch precision."""
    check_precision(precision)
    if round_dropout is None:
        round_dropout = ROUND_DROPOUT if lock and not independent else 0.0
    if (independent or round_dropout) and not lock:
        raise ValueError("Independent rounds and round dropout need locked rounds: a round must not write the rows "
                         "of the rounds taken out while it trains; pass lock=True.")
    if not 0 <= round_dropout <= 1 or (independent and round_dropout):
        raise ValueError(f"round_dropout must lie in [0, 1] and does not combine with independent rounds (which "
                         f"keep every earlier round out), got {round_dropout}.")
    return round_dropout


def _round_patch(model: torch.nn.Module, before: torch.nn.Module, patch_dir: str | Path | None, method: str,
                 index: int, precision: str) -> tuple[MemoryPatch, int]:
    """Save the round's patch and return it with its file size in bytes; the model is left holding what the file
    holds (an int8 patch's decoded rows), so later rounds build on what ships."""
    patch = make_patch(model, before)
    if precision == "int8":
        shipped = quantize_patch(patch)
        apply_patch(revert_patch(model, patch), shipped)
        patch = shipped
    if patch_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return patch, write_patch(patch, Path(tmp) / "round.safetensors").stat().st_size
    return patch, write_patch(patch, Path(patch_dir) / method / f"round-{index}.safetensors").stat().st_size


def _score_round(entry: dict, setup: Setup, model: torch.nn.Module, seen: Sequence[Sequence[Fact]]) -> None:
    """Append one retention row and the forgetting figures on everything seen so far."""
    recalls, scores = score_rounds(setup, model, seen)
    entry["retention"].append(recalls)
    for key in ("known_fact_drop_pct", "ppl_increase_pct", "paraphrase_recall"):
        entry[key].append(scores[key])


def revert_round(model: torch.nn.Module, patches: Sequence[MemoryPatch],
                 index: int = 0) -> tuple[MemoryPatch, dict[int, torch.Tensor]]:
    """Revert, in place, the rows of round `index`'s patch that no later round changed; return the patch reverted
    and, per layer, the rows it shares with later rounds (left as they are: they hold later rounds' learning too).
    """
    own, later = patches[index], patches[index + 1:]
    kept, shared = MemoryPatch({}, {}, {}, own.addressing), {}
    for layer, rows in own.rows.items():
        changed_later = [p.rows[layer] for p in later if layer in p.rows]
        is_shared = torch.isin(rows, torch.cat(changed_later)) if changed_later else torch.zeros_like(rows, dtype=bool)
        shared[layer], keep = rows[is_shared], ~is_shared
        kept.rows[layer], kept.values[layer] = rows[keep], own.values[layer][keep]
        kept.before[layer] = own.before[layer][keep]
    revert_patch(model, kept)  # checks that every kept row still holds the round's values
    return kept, shared


def revert_summary(setup: Setup, parts: Sequence[Sequence[Fact]], stream: MethodStream, index: int = 0) -> dict:
    """Revert round `index` on the stream's final model (in place) and score every round again."""
    reverted, shared = revert_round(stream.model, stream.patches, index)
    recalls, scores = score_rounds(setup, stream.model, parts)
    return {"round_index": index, "rows": stream.patches[index].n_rows, "rows_reverted": reverted.n_rows,
            "rows_shared_with_later_rounds": sum(len(r) for r in shared.values()),
            "recall_before": stream.entry["retention"][-1],
            "recall_after": recalls,
            "known_fact_drop_pct": scores["known_fact_drop_pct"], "ppl_increase_pct": scores["ppl_increase_pct"]}


def new_stream_summary(setup: Setup, parts: Sequence[Sequence[Fact]], seed: int, tuning: dict | None) -> dict:
    """The stream summary before any method is added (the result-file contract's top level)."""
    taught = {f.id for part in parts for f in part}
    return {"profile": setup.profile.name, "model": setup.profile.model, "seed": seed, "split": setup.split,
            "rounds": len(parts), "facts_per_round": len(parts[0]),
            "round_fact_ids": [[f.id for f in part] for part in parts],
            "facts_left_out": [f.id for f in setup.facts if f.id not in taught],
            "known": len(setup.known), "memory_bytes": memory_bytes(setup.model),
            "base": {k: setup.base[k] for k in BASE_KEYS},
            "hyperparameters_from": (tuning or {}).get("source", "given"), "methods": {}}


def run_stream(profile: str | Profile | None = None, methods: Sequence[str] = STREAM_METHODS, rounds: int = 5,
               out: str | Path | None = None, hypers: dict[str, dict] | None = None, seed: int = 0,
               progress: bool = True, lock: bool = True, independent: bool = False, precision: str = "int8",
               round_dropout: float | None = None, split: str = "test", facts_per_round: int | None = None,
               fit_gates: int | None = None, train_in: str = "auto") -> dict:
    """Teach the split's facts (the test facts; "tune" to choose settings) in `rounds` rounds of `facts_per_round`
    (default: the profile's for the test split; without one, or on the tune split, the profile's facts of the split
    shared out) with every method; write `out/summary.json`, `out/stream.png` and the sparse methods' patches
    (`out/patches/<method>/round-<i>.safetensors`) after every method; return the summary.

    `hypers` (method -> TrainConfig fields) defaults to the profile's tuned settings; with `lock` (the default),
    sparse methods keep each round's rows out of later rounds' reach, and with `independent` train each round on
    the memory without the earlier rounds' rows, or with `round_dropout` with each out at a step with that
    probability (None: ROUND_DROPOUT for locked rounds trained in sequence); patches are saved in `precision`
    (`stream_method`). The memory's gates are fitted for `fit_gates` steps before the rounds (`gates.fit_gates`;
    None: STREAM_GATES where a sparse method runs, 0: the random gates), and with fitted gates sparse methods train
    with a locality term of weight STREAM_LOCALITY unless their settings give one. Every method trains in the
    precision `train_precision(train_in)` gives, unless its settings name one."""
    profile = get_profile(profile)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"Unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(METHODS)}.")
    profile = _cut_to_rounds(profile, split, rounds, facts_per_round or (profile.run.facts_per_round
                                                                          if split == "test" else None))
    round_dropout = _check_rounds(lock, independent, precision, round_dropout)
    arithmetic = train_precision(train_in)
    if fit_gates is not None and fit_gates < 0:
        raise ValueError(f"--fit-gates is a number of steps >= 0 (0: random gates), got {fit_gates}.")
    tuning = None
    if hypers is None:
        hypers, tuning = tuned_settings(profile, methods, progress=progress)
    if missing := [m for m in methods if m not in hypers]:
        raise ValueError(f"No settings given for {', '.join(missing)}.")
    profile, hypers = _with_fitted_gates(profile, methods, hypers, fit_gates)
    hypers = {m: {"precision": arithmetic, **h} for m, h in hypers.items()}
    if gated := [m for m in methods if m in SPARSE_METHODS and hypers[m].get("gate_lr")]:
        raise ValueError(f"{', '.join(gated)}: a stream leaves a patch of value rows per round, and trained gates "
                         "would not fit it; run the stream with gate_lr=0 (gates fitted once beforehand, "
                         "MemoryConfig(fit_gates=N), do fit).")
    out = Path(out or Path("results") / f"stream-{profile.name}")
    started = time.perf_counter()
    setup = prepare(profile, split, seed=seed, progress=progress, full_base=False)  # scored as rounds are
    parts = split_rounds(setup.facts, rounds)
    summary = new_stream_summary(setup, parts, seed, tuning)
    summary |= {"locked_rounds": lock, "independent_rounds": independent, "patch_precision": precision,
                "round_dropout": round_dropout, "fit_gates": profile.memory.fit_gates, "train_precision": arithmetic}
    for method in methods:
        stream = stream_method(setup, parts, method, hypers[method], out / "patches", seed, progress, lock,
                               independent, precision, round_dropout)
        if method in SPARSE_METHODS:
            stream.entry["revert"] = revert_summary(setup, parts, stream)
        summary["methods"][method] = stream.entry
        summary["total_seconds"] = time.perf_counter() - started
        write_stream(summary, out)  # after every method: a stopped run keeps what it finished
        del stream
    return summary


def train_precision(precision: str = "auto") -> str:
    """The TrainConfig precision the stream trains in: "auto" is bf16 on a CPU with native bf16 arithmetic
    (AVX512-BF16 or AMX) and the trainer's own "auto" elsewhere (bf16 on a GPU that has it, fp32 on other CPUs)."""
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {precision!r}.")
    if precision == "auto" and default_device().type == "cpu" and _cpu_has_bf16():
        return "bf16"
    return precision


def _cpu_has_bf16() -> bool:
    """Whether this CPU reports native bf16 instructions (Linux only; elsewhere False, and the stream trains fp32)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _with_fitted_gates(profile: Profile, methods: Sequence[str], hypers: dict[str, dict],
                       steps: int | None) -> tuple[Profile, dict[str, dict]]:
    """The profile with its gates fitted for `steps` steps (None: STREAM_GATES where a sparse method runs, or
    the profile's own), and the sparse methods' settings with the locality term that goes with fitted gates."""
    sparse = [m for m in methods if m in SPARSE_METHODS]
    if steps is None:
        steps = profile.memory.fit_gates or (STREAM_GATES if sparse and profile.memory.mode == "additive" else 0)
    if steps:
        hypers = {m: {"locality": STREAM_LOCALITY, **h} if m in sparse else h for m, h in hypers.items()}
    return replace(profile, memory=replace(profile.memory, fit_gates=steps)), hypers


def _cut_to_rounds(profile: Profile, split: str, rounds: int, per_round: int | None) -> Profile:
    """The profile with its split's facts cut to `rounds` rounds of `per_round` of the split's facts (None: the
    profile's facts shared out); a bad size fails here, before any model is loaded."""
    facts = split_facts(profile, split) if per_round is None else load_facts(split=split)
    split_rounds(facts, rounds)
    if per_round is None:
        return profile
    if not 1 <= per_round <= len(facts) // rounds:
        raise ValueError(f"--facts-per-round must lie between 1 and {len(facts) // rounds} ({len(facts)} {split} "
                         f"facts in {rounds} rounds), got {per_round}.")
    limit = {"n_facts" if split == "test" else "tune_facts": rounds * per_round}
    return replace(profile, run=replace(profile.run, **limit))


def write_stream(summary: dict, out: str | Path) -> None:
    """Write summary.json and stream.png into `out`, each atomically."""
    out = Path(out)
    write_json(out / "summary.json", summary)
    save_figure(plot_stream(summary), out / "stream.png")
