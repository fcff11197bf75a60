"""The run's report: figures at matched recall, several seeds' summaries combined, the comparison tables
(report.md), the learning-vs-forgetting figure (pareto.png), and the table of a tuning run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .files import save_figure, write_json, write_text

LABELS = {"smf_kl": "SMF (KL)", "smf_tfidf": "SMF (TF-IDF)", "smf_random": "SMF (random slots)",
          "full_ft": "Full finetuning", "lora": "LoRA"}
MATCHED = [("paraphrase_recall", "paraphrase recall", "{:.2f}"), ("ppl_increase_pct", "ppl change %", "{:+.2f}"),
           ("known_fact_drop_pct", "known-fact drop %", "{:.1f}"),
           ("known_fact_drop_firm_pct", "firm: drop %", "{:.1f}"),
           ("known_nll_increase", "known-answer loss change (nats)", "{:+.3f}"), ("step", "step", "{:.0f}")]
FINAL = [("fact_recall", "fact recall", "{:.2f}"), ("paraphrase_recall", "paraphrase recall", "{:.2f}"),
         ("ppl_increase_pct", "ppl change %", "{:+.2f}"), ("kl_to_base", "KL to base", "{:.4f}"),
         ("known_fact_drop_pct", "known-fact drop %", "{:.1f}"),
         ("known_fact_drop_firm_pct", "firm: drop %", "{:.1f}"),
         ("known_fact_gain_pct", "known-fact gain %", "{:.1f}"),
         ("known_nll_increase", "known-answer loss change (nats)", "{:+.3f}"),
         ("answer_bleed_pct", "answer bleed %", "{:.1f}"),
         ("steps", "steps", "{:.0f}"), ("params_changed", "params changed", "{:,.0f}"),
         ("train_seconds", "train s", "{:.0f}"), ("peak_rss_mb", "peak MB", "{:,.0f}")]

MATCHED_KEYS = ("paraphrase_recall", "ppl_increase_pct", "known_fact_drop_pct", "known_fact_drop_firm_pct",
                "known_nll_increase")


def at_matched_recall(checkpoints: Sequence[dict], target: float) -> dict | None:
    """Each figure linearly interpolated in fact recall at `target`, between the last checkpoint below it and the
    first at or above it (step 0 included; figures that either lacks are left out); None when none reached it."""
    if checkpoints and checkpoints[0]["fact_recall"] >= target:  # known before any training
        return {"recall": checkpoints[0]["fact_recall"], "step": 0,
                **{k: checkpoints[0][k] for k in MATCHED_KEYS if k in checkpoints[0]}}
    for before, after in zip(checkpoints, checkpoints[1:]):
        if after["fact_recall"] >= target > before["fact_recall"]:
            w = (target - before["fact_recall"]) / (after["fact_recall"] - before["fact_recall"])
            return {"recall": target, "step": before["step"] + w * (after["step"] - before["step"]),
                    **{k: before[k] + w * (after[k] - before[k]) for k in MATCHED_KEYS if k in before and k in after}}
    return None


def combine_seeds(runs: Sequence[dict]) -> dict:
    """One summary from runs on several seeds: each figure the mean over seeds, the runs under `per_seed` (each
    with its `seed`); in replace mode every seed heals its own memory, so `heal` is their mean, each under its
    `per_seed` too."""
    summary = {**runs[0], "seeds": [r["seed"] for r in runs]}
    if len(runs) == 1:
        return {**summary, "methods": {m: {**v, "per_seed": []} for m, v in summary["methods"].items()}}
    if heals := [r["heal"] for r in runs if r.get("heal")]:
        summary["heal"] = {**_mean(heals), "per_seed": [{"seed": r["seed"], **r["heal"]} for r in runs]}
    summary["methods"] = {}
    for method in runs[0]["methods"]:
        per_seed = [{"seed": r["seed"], **r["methods"][method]} for r in runs if method in r["methods"]]
        matched = [m["at_matched_recall"] for m in per_seed if m["at_matched_recall"]]
        summary["methods"][method] = {
            **_mean([{k: v for k, v in m.items() if not k.endswith("_ci95") and k != "seed"} for m in per_seed]),
            "at_matched_recall": {k: v for k, v in _mean(matched).items() if not k.endswith("_std")} if matched
            else None, "seeds_reaching_target": len(matched), "target_reached": len(matched) == len(per_seed),
            "per_seed": per_seed}
    return summary


def _mean(items: Sequence[dict]) -> dict:
    """Means and spreads (`<key>_std`) of the numbers shared by all items, nested dicts of numbers averaged;
    other values from the first item."""
    out = {}
    for key, value in items[0].items():
        values = [item.get(key) for item in items]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and all(v is not None for v in values):
            out[key] = sum(values) / len(values)
            out[f"{key}_std"] = float(torch.tensor(values, dtype=torch.float64).std()) if len(values) > 1 else 0.0
        elif isinstance(value, dict) and all(isinstance(v, dict) for v in values):
            out[key] = {k: v for k, v in _mean(values).items() if not k.endswith("_std")}
        else:
            out[key] = value
    return out


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _table(rows: dict[str, dict | None], columns: list[tuple[str, str, str]], first: str = "method") -> list[str]:
    lines = [f"| {first} | " + " | ".join(c[1] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        cells = ["not reached"] + [""] * (len(columns) - 1) if row is None else [
            fmt.format(row[key]) if row.get(key) is not None else "–" for key, _, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _interval(m: dict, key: str) -> str:
    """A run's interval; with several seeds, each seed's (their mean has none of its own)."""
    if m.get("per_seed"):
        return "; ".join(_interval(run, key) for run in m["per_seed"])
    low, high = m.get(key) or (float("nan"), float("nan"))
    return f"[{low:+.2f}, {high:+.2f}]"


def _seed_cell(run: dict) -> str:
    where = run.get("at_matched_recall") or run
    mark = "" if run.get("at_matched_recall") else " (target not reached)"
    seed = f"seed {run['seed']}: " if "seed" in run else ""
    return f"{seed}{where['known_fact_drop_pct']:.1f}, {where['ppl_increase_pct']:+.2f}{mark}"


def _heal_lines(heal: dict | None) -> list[str]:
    if not heal:
        return []
    seeds = f", mean of {len(heal['per_seed'])} seeds" if heal.get("per_seed") else ""
    return [f"The MLPs were replaced and the memory healed ({heal['steps']:.0f} steps, {heal['seconds'] / 60:.1f} min"
            f"{seeds}): "
            f"held-out perplexity {heal['ppl_base']:.2f} for the base model, {heal['ppl_before']:.2f} with the MLPs "
            f"replaced, {heal['ppl_after']:.2f} healed; known facts answered {heal['known_fact_acc_base']:.1%} by "
            f"the base model, {heal['known_fact_acc_after']:.1%} healed.", ""]


def format_report(summary: dict) -> str:
    """The Markdown report: setup, the comparison at matched recall, the final scores with 95% intervals."""
    r, base, methods = summary["retrofit"], summary["base"], summary["methods"]
    seeds = summary.get("seeds", [summary["seed"]])
    target = summary["target_recall"]
    lines = [
        f"# Sparse memory finetuning vs dense finetuning — profile `{summary['profile']}`", "",
        f"Model `{summary['model']}`, {summary['n_facts']} test facts, seeds {', '.join(map(str, seeds))}"
        + (" (figures are means over seeds)" if len(seeds) > 1 else "") + f". Memory ({r['mode']}) in layers "
        f"{r['layers']}, {r['slots_per_layer']:,} slots each, {r['memory_params']:,} memory parameters; "
        f"max |logit difference| right after retrofit: {r['max_abs_logit_diff']:.2e}. Settings: "
        f"{summary.get('hyperparameters_from', 'given')}.", "",
        f"Retrofitted model before training: held-out perplexity {base['heldout_ppl']:.2f}, fact recall "
        f"{base['fact_recall']:.2f}, paraphrase recall {base['paraphrase_recall']:.2f}, answer bleed "
        f"{base['answer_bleed_pct']:.1f}%; it answers {base['known_facts_kept_by_base']} of the split's "
        f"{base['known_facts_total']} known facts (the ones that can be forgotten), "
        f"{base.get('known_facts_firm', '–')} of them firmly (answer loss ≤ 1 nat per token; \"firm\" columns).", "",
        *_heal_lines(summary.get("heal")),
        f"## At matched learning (fact recall {target:.2f})", "",
        "Each figure interpolated between the two checkpoints around the target recall.", "",
        *_table({_label(m): v.get("at_matched_recall") for m, v in methods.items()}, MATCHED), "",
        "## At the end of training", "",
        "Training stops at the first checkpoint at or above the target recall, or when the step budget runs out.", "",
        *_table({_label(m): v for m, v in methods.items()}, FINAL), "",
        "95% bootstrap intervals (held-out texts, known facts resampled; one per seed); learning rates and loss:", "",
        "| method | ppl change % | known-fact drop % | lr | loss on |", "|---|---|---|---|---|",
    ]
    for method, m in methods.items():
        hyper = m.get("hyper", {})
        lines.append(f"| {_label(method)} | {_interval(m, 'ppl_increase_ci95')} | "
                     f"{_interval(m, 'known_fact_drop_ci95')} | {m['lr']:g} | {hyper.get('loss_on', '')} |")
    if len(seeds) > 1:
        lines += ["", "Per seed, known-fact drop % and ppl change % at matched recall (else at the end):", ""]
        for method, m in methods.items():
            lines.append(f"- {_label(method)}: " + "; ".join(_seed_cell(s) for s in m.get("per_seed", [])))
    if "total_seconds" in summary:
        lines += ["", f"Whole run: {summary['total_seconds'] / 60:.1f} minutes."]
    return "\n".join(lines) + "\n"


def format_tuning(result: dict) -> str:
    """The Markdown table of a tuning run: every candidate, and which one each method keeps."""
    chosen = result["methods"]
    lines = [f"# Settings chosen on the tune split — profile `{result['profile']}` ({result['date']})", "",
             f"{len(result['tune_fact_ids'])} tune facts, {result['tune_known']} known facts; target recall "
             f"{result['target_recall']:.2f} within {result['max_steps']} steps. Forgetting at matched recall where "
             "the target was reached, else at the last checkpoint.", "",
             "| method | lr | loss on | reached | steps | recall | paraphrase | ppl change % | known drop % | kept |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["table"]:
        keep = chosen[row["method"]] == {"lr": row["lr"], "loss_on": row["loss_on"]}
        reached = "yes" if row["reached"] else "no"
        lines.append(f"| {_label(row['method'])} | {row['lr']:g} | {row['loss_on']} | {reached}"
                     f" | {row['steps']} | {row['fact_recall']:.2f} | {row['paraphrase_recall']:.2f} | "
                     f"{row['ppl_increase_pct']:+.2f} | {row['known_fact_drop_pct']:.1f} | {'✓' if keep else ''} |")
    return "\n".join(lines) + "\n"


def plot_pareto(summary: dict) -> plt.Figure:
    """Learning (fact recall) against forgetting (perplexity change, known-fact drop) over checkpoints, one curve
    per method from the measured step 0; symmetric-log axes so that +300% and +0.2% both read."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for method, points in summary.get("checkpoints", {}).items():
        recall = [p["fact_recall"] for p in points]
        for ax, key in zip(axes, ("ppl_increase_pct", "known_fact_drop_pct")):
            ax.plot([p[key] for p in points], recall, marker="o", label=_label(method))
    for ax, title in zip(axes, ("held-out perplexity change (%)", "known facts forgotten (%)")):
        ax.set_xscale("symlog", linthresh=1.0)
        ax.axhline(summary["target_recall"], color="grey", ls="--", lw=0.8)
        ax.set_xlabel(title + "  →  more forgetting")
        ax.set_ylabel("new-fact recall")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("Learning vs forgetting over training (upper left is better; dashed: matched recall)")
    return fig


def write_results(summary: dict, out: str | Path) -> None:
    """Write summary.json, report.md and pareto.png into `out`, each atomically."""
    out = Path(out)
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", format_report(summary))
    figure = plot_pareto(summary)
    save_figure(figure, out / "pareto.png")
    plt.close(figure)
