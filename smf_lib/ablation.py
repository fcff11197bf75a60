"""One variant of sparse memory finetuning (or a baseline, for reference) on the tune split, for ablations.

    python -m smf_lib.ablation --name smooth temperature=0.05 lr=1.0 count_on=subject
    python -m smf_lib.ablation --name full_ft_lr3e-5 --method full_ft lr=3e-5

Settings named like `MemoryConfig` fields change the memory (it is retrofitted and calibrated anew), the others
are `TrainConfig` fields. The variant trains on the tune facts until fact recall reaches the target (or the tune
budget runs out) and is scored like a `run` method, on the tune split only; the result is written to
`results/ablation/<profile>/<name>.json`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .experiment import method_summary, prepare, train_method
from .files import write_json
from .plots import GREY, theme
from .profiles import get_profile
from .retrofit import MemoryConfig
from .training import METHODS, TrainConfig

MEMORY_FIELDS = {f.name for f in dataclasses.fields(MemoryConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "steps", "seed"}


def parse_settings(items: list[str]) -> tuple[dict, dict]:
    """`key=value` strings into (memory settings, training settings); values are Python literals or strings."""
    memory, train = {}, {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in MEMORY_FIELDS | TRAIN_FIELDS:
            raise ValueError(f"{item!r} is not key=value with a MemoryConfig or TrainConfig field as key; "
                             f"fields: {', '.join(sorted(MEMORY_FIELDS | TRAIN_FIELDS))}.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        (memory if key in MEMORY_FIELDS else train)[key] = value
    return memory, train


def run_variant(profile: str, memory: dict, train: dict, method: str = "smf_kl", seed: int = 0,
                augment: int = 0, progress: bool = True) -> dict:
    """Train one variant on the tune split (with `augment` more wordings per fact) and return its
    `run`-shaped method summary plus its settings."""
    profile_ = get_profile(profile)
    started = time.perf_counter()
    setup = prepare(profile_, "tune", seed=seed, memory=dataclasses.replace(profile_.memory, **memory),
                    augment=augment, progress=progress)
    run = train_method(setup, method, train, max_steps=profile_.run.tune_steps, seed=seed, progress=progress)
    summary = method_summary(setup, run)
    return {"profile": profile_.name, "method": method, "seed": seed, "memory": memory, "train": train,
            "augment": augment, "n_facts": len(setup.facts), "base": setup.base, **summary,
            "checkpoints": run.checkpoints, "total_seconds": time.perf_counter() - started}


def load_variants(folder: str | Path) -> dict[str, dict]:
    """Every variant's result in `folder` (`results/ablation/<profile>/`), by name, oldest first."""
    paths = sorted(Path(folder).glob("*.json"), key=lambda p: p.stat().st_mtime)
    return {p.stem: json.loads(p.read_text()) for p in paths}


def plot_ablations(variants: dict[str, dict], names: Sequence[str] | None = None) -> Figure:
    """Per variant, held-out recall at the end against known facts forgotten (left) and against answer bleed
    (right); a hollow marker is a variant that missed the recall target within the budget."""
    with theme():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
        for name in names or list(variants):
            r = variants[name]
            reached = r.get("at_matched_recall") is not None
            for ax, key in zip(axes, ("known_fact_drop_pct", "answer_bleed_pct")):
                ax.scatter(r[key], r["paraphrase_recall"], s=40, edgecolors="C0",
                           facecolors="C0" if reached else "none")
                ax.annotate(name, (r[key], r["paraphrase_recall"]), xytext=(4, 3), textcoords="offset points",
                            fontsize=7, color=GREY)
        for ax, label in zip(axes, ("known facts forgotten (%)", "answer bleed (% of unchanged prompts)")):
            ax.set_xlabel(label + "  →  worse")
            ax.set_ylabel("held-out recall (all formats)")
            ax.set_ylim(-0.02, 1.0)
            ax.grid(True)
        fig.suptitle("Sparse memory variants on the tune split (upper left is better; hollow: target not reached)")
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> None:
    """Command line: run one variant and write its result."""
    parser = argparse.ArgumentParser(prog="python -m smf_lib.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", help="key=value, MemoryConfig or TrainConfig fields")
    parser.add_argument("--name", required=True, help="the variant's name (its result file's name)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--method", default="smf_kl", choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", type=int, default=0, help="wordings added per fact (augment.py)")
    args = parser.parse_args(argv)
    try:
        memory, train = parse_settings(args.settings)
    except ValueError as error:
        parser.error(str(error))
    result = run_variant(args.profile, memory, train, args.method, args.seed, args.augment)
    write_json(Path("results") / "ablation" / args.profile / f"{args.name}.json", result)
    matched = result["at_matched_recall"] or {}
    print(json.dumps({"name": args.name, "recall": result["fact_recall"], "steps": result["steps"],
                      "paraphrase": result["paraphrase_recall"], "by_format": result["paraphrase_by_format"],
                      "bleed_pct": result["answer_bleed_pct"], "drop_pct": result["known_fact_drop_pct"],
                      "ppl_pct": result["ppl_increase_pct"], "matched": matched}, indent=1))


if __name__ == "__main__":
    main()
