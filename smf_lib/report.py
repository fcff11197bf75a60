"""The run's report: the comparison table (report.md) and the learning-vs-forgetting figure (pareto.png)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from .files import save_figure, write_json, write_text

LABELS = {"smf_kl": "SMF (KL)", "smf_tfidf": "SMF (TF-IDF)", "smf_random": "SMF (random slots)",
          "full_ft": "Full finetuning", "lora": "LoRA"}
COLUMNS = [("fact_recall", "fact recall", "{:.2f}"), ("paraphrase_recall", "paraphrase recall", "{:.2f}"),
           ("heldout_ppl", "held-out ppl", "{:.2f}"), ("ppl_increase_pct", "ppl change %", "{:+.2f}"),
           ("known_fact_acc", "known facts kept", "{:.2f}"), ("known_fact_drop_pct", "known-fact drop %", "{:.1f}"),
           ("params_trained", "params trained", "{:,}"), ("params_changed", "params changed", "{:,}"),
           ("steps", "steps", "{}"), ("train_seconds", "train s", "{:.0f}"), ("lr", "lr", "{:g}")]


def format_report(summary: dict) -> str:
    """The Markdown report: setup, the comparison table at matched learning, and the learning-rate sweeps."""
    r, base = summary["retrofit"], summary["base"]
    lines = [
        f"# Sparse memory finetuning vs dense finetuning — profile `{summary['profile']}`", "",
        f"Model `{summary['model']}`, {summary['n_facts']} new facts, seed {summary['seed']}. Memory in layers "
        f"{r['layers']}, {r['slots_per_layer']:,} slots each, {r['memory_params']:,} memory parameters; "
        f"max |logit difference| right after retrofit: {r['max_abs_logit_diff']:.2e}.", "",
        f"Base model: held-out perplexity {base['heldout_ppl']:.2f}, fact recall {base['fact_recall']:.2f}, "
        f"{base['known_facts_kept_by_base']} of {base['known_facts_total']} known facts answered (these are the ones "
        "that can be forgotten).", "",
        f"Each method trains until fact recall reaches {summary['target_recall']:.2f} or its step budget runs out; "
        "forgetting is measured there (matched learning).", "",
        "| method | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for method, m in summary["methods"].items():
        cells = [fmt.format(m[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    sweeps = {k: v for k, v in summary.get("sweeps", {}).items() if v}
    if sweeps:
        lines += ["", "## Learning-rate sweeps", "",
                  "Each candidate trained on a few facts for a short budget; the best recall wins, ties go to the "
                  "smaller perplexity increase.", "",
                  "| method | lr | fact recall | ppl change % | known-fact drop % |",
                  "|---|---|---|---|---|"]
        for method, rows in sweeps.items():
            for row in rows:
                lines.append(f"| {LABELS.get(method, method)} | {row['lr']:g} | {row['fact_recall']:.2f} | "
                             f"{row['ppl_increase_pct']:+.2f} | {row['known_fact_drop_pct']:.1f} |")
    if "total_seconds" in summary:
        lines += ["", f"Whole run: {summary['total_seconds'] / 60:.1f} minutes."]
    return "\n".join(lines) + "\n"


def plot_pareto(summary: dict) -> plt.Figure:
    """Learning (fact recall) against forgetting (perplexity change, known-fact drop), one curve per method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for method, points in summary.get("checkpoints", {}).items():
        points = [{"fact_recall": 0.0, "ppl_increase_pct": 0.0, "known_fact_drop_pct": 0.0}] + points
        recall = [p["fact_recall"] for p in points]
        for ax, key in zip(axes, ("ppl_increase_pct", "known_fact_drop_pct")):
            ax.plot([p[key] for p in points], recall, marker="o", label=LABELS.get(method, method))
    for ax, title in zip(axes, ("held-out perplexity change (%)", "known facts forgotten (%)")):
        ax.set_xlabel(title + "  →  more forgetting")
        ax.set_ylabel("new-fact recall")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("Learning vs forgetting over training (upper left is better)")
    return fig


def write_results(summary: dict, out: str | Path) -> None:
    """Write summary.json, report.md and pareto.png into `out`, each atomically."""
    out = Path(out)
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", format_report(summary))
    figure = plot_pareto(summary)
    save_figure(figure, out / "pareto.png")
    plt.close(figure)
