"""Figures and small tables for training on new facts (notebook 3) and for measuring forgetting (notebook 4).

Every `plot_*` function returns its matplotlib Figure, drawn in the theme of `plots.theme()` (transparent background,
mid-grey text) so it reads on light and dark notebook themes alike. Sections:

- training curves: loss, selected rows per step, recall at checkpoints
- what changed: the changed value rows on the product-key grid, before/after completions, variants side by side
- comparing methods: recall over steps, the Pareto figure
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .evaluation import contains_answer
from .plots import GREY, PALETTE, theme
from .report import LABELS, plot_pareto
from .retrofit import memory_layers
from .training import History


def _finish(fig: Figure) -> Figure:
    """Detach the figure from pyplot so a notebook shows it once (as the cell's value)."""
    plt.close(fig)
    return fig


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), the same length as `values`."""
    x = np.asarray(values, dtype=float)
    if window <= 1 or len(x) < 2:
        return x
    cumsum = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(len(x)):
        lo = max(0, i + 1 - window)
        out[i] = (cumsum[i + 1] - cumsum[lo]) / (i + 1 - lo)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------------------------


def plot_training(history: History, top_t: int | None = None, n_slots: int | None = None,
                  recall_keys: Sequence[str] = ("fact_recall", "paraphrase_recall"),
                  start: Mapping[str, float] | None = None,
                  title: str | None = None) -> Figure:
    """Three panels from one `History`: the loss per step (with a moving average), the value rows selected per
    memory layer per step (the budget `top_t` dashed) and the recall the callback measured at checkpoints
    (`start`: the same scores before training, drawn at step 0)."""
    steps = np.arange(1, len(history.loss) + 1)
    with theme():
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
        ax = axes[0]
        ax.plot(steps, history.loss, color=PALETTE[0], alpha=0.35, lw=1, label="per step")
        ax.plot(steps, _smooth(history.loss, max(3, len(steps) // 10)), color=PALETTE[0], lw=2, label="moving average")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats per token)")
        ax.set_title("Training loss")
        ax.grid()
        ax.legend(fontsize=8)

        ax = axes[1]
        if history.selected:
            layers = sorted(history.selected[0])
            for j, layer in enumerate(layers):
                ax.plot(steps[: len(history.selected)], [s[layer] for s in history.selected],
                        color=PALETTE[j % len(PALETTE)], lw=1.6, label=f"layer {layer}")
            if top_t is not None:
                ax.axhline(top_t, color=GREY, ls="--", lw=1)
                ax.text(1, top_t, f" top-t = {top_t:,}", color=GREY, fontsize=8, va="bottom")
            ax.set_ylim(0, max(top_t or 0, max(max(s.values()) for s in history.selected)) * 1.12)
            ax.legend(fontsize=8, loc="lower right")
            note = f" of {n_slots:,} slots" if n_slots else ""
            ax.set_title(f"Value rows updated per step{note}")
        else:
            ax.text(0.5, 0.5, "dense method:\nno row selection", ha="center", va="center", color=GREY,
                    transform=ax.transAxes)
            ax.set_title("Value rows updated per step")
        ax.set_xlabel("step")
        ax.set_ylabel("rows per layer")
        ax.grid()

        ax = axes[2]
        points = [c for c in history.checkpoints if any(k in c for k in recall_keys)]
        for j, key in enumerate(recall_keys):
            xs = [c["step"] for c in points if key in c]
            ys = [c[key] for c in points if key in c]
            if start and key in start:
                xs, ys = [0] + xs, [start[key]] + ys
            if not ys:
                continue
            ax.plot(xs, ys, marker="o", color=PALETTE[(j + 2) % len(PALETTE)], lw=1.8,
                    label=key.replace("_", " "))
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("step")
        ax.set_ylabel("share of facts answered")
        ax.set_title("Recall at checkpoints")
        ax.grid()
        ax.legend(fontsize=8, loc="upper left")
        if title:
            fig.suptitle(title)
    return _finish(fig)


# ---------------------------------------------------------------------------------------------------------------
# What changed
# ---------------------------------------------------------------------------------------------------------------


def plot_value_changes(before: Mapping[str, torch.Tensor], model: torch.nn.Module, title: str | None = None) -> Figure:
    """Where training wrote, per memory layer: the size of each value row's change, ‖v_i(after) − v_i(before)‖,
    laid out on the product-key grid (slot i = (i // n_keys, i % n_keys), the pair of sub-keys that address it).
    Rows that did not change are left blank; the title of each panel counts them."""
    names = {id(p): n for n, p in model.named_parameters()}
    layers = memory_layers(model)
    norms = {}
    for m in layers:
        w = m.values.weight.detach().float().cpu()
        delta = (w - before[names[id(m.values.weight)]].float().cpu()).norm(dim=1)
        norms[m.layer_index] = delta.view(m.n_keys, m.n_keys).numpy()
    top = max((float(v.max()) for v in norms.values()), default=1.0) or 1.0
    with theme():
        fig, axes = plt.subplots(1, len(layers), figsize=(4.1 * len(layers) + 1.2, 4.3), layout="constrained",
                                 squeeze=False)
        image = None
        for ax, m in zip(axes[0], layers):
            grid = norms[m.layer_index]
            n_changed = int((grid > 0).sum())
            shown = np.ma.masked_where(grid == 0, grid)
            image = ax.imshow(shown, cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
            ax.set_title(f"layer {m.layer_index}: {n_changed:,} of {m.n_slots:,} rows ({n_changed / m.n_slots:.1%})")
            ax.set_xlabel("second sub-key")
            ax.set_ylabel("first sub-key")
            for side in ax.spines.values():
                side.set_visible(True)
        if image is not None:
            bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85)
            bar.set_label("‖Δ value row‖")
            bar.outline.set_edgecolor(GREY)
        fig.suptitle(title or "Which value rows training changed (blank: untouched, bit for bit)")
    return _finish(fig)


def plot_read_share(shares: Mapping[str, Sequence[float]], hits: Mapping[str, Sequence[bool]] | None = None,
                    title: str | None = None) -> Figure:
    """Per group of prompts (e.g. trained wordings, held-out wordings, other subjects), the share of each prompt's
    memory read at its last token that falls on trained rows (`analysis.trained_read_share`), one dot per prompt;
    with `hits`, filled dots are the prompts whose completion gave the answer."""
    with theme():
        fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
        rng = np.random.default_rng(0)
        for row, (name, values) in enumerate(shares.items()):
            values = np.asarray(values, dtype=float)
            y = row + rng.uniform(-0.18, 0.18, len(values))
            color = PALETTE[row % len(PALETTE)]
            hit = np.asarray(hits[name], dtype=bool) if hits and name in hits else np.zeros(len(values), bool)
            ax.scatter(values[~hit], y[~hit], s=18, facecolors="none", edgecolors=color, linewidths=1)
            ax.scatter(values[hit], y[hit], s=18, color=color)
            ax.plot([np.median(values)] * 2, [row - 0.3, row + 0.3], color=GREY, lw=2)
        ax.set_yticks(range(len(shares)), list(shares))
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("share of the memory read that lands on trained rows (last token; bar: median)")
        ax.set_title(title or "Does a prompt read what training wrote? (filled: the completion gave the answer)")
    return _finish(fig)


def completion_table(prompts: Sequence[str], answers: Sequence[str], **columns: Sequence[str]):
    """A table of prompt, expected answer and each named list of completions (e.g. before=..., after=...), with a ✓
    where the completion contains the answer. Returned as a pandas Styler (no truncated cells; `.data` is the
    DataFrame); newlines show as ⏎."""
    import pandas as pd

    data = {"prompt": [p.replace("\n", " ⏎ ") for p in prompts], "answer": list(answers)}
    for name, completions in columns.items():
        data[name] = [c.strip().replace("\n", " ⏎ ") for c in completions]
        data[f"{name} ✓"] = ["✓" if contains_answer(c, [a]) else "" for c, a in zip(completions, answers)]
    return pd.DataFrame(data).style.hide(axis="index").set_properties(**{"text-align": "left"})


def plot_variants(scores: Mapping[str, Mapping[str, float]], metrics: Mapping[str, str],
                  title: str | None = None) -> Figure:
    """One panel per metric (key -> axis label), one bar per variant: e.g. each memory layer's trained rows alone
    against all of them (`analysis.layer_attribution`), or KL-selected rows against random ones."""
    with theme():
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), layout="constrained",
                                 squeeze=False)
        names = list(scores)
        for ax, (key, label) in zip(axes[0], metrics.items()):
            values = [scores[n][key] for n in names]
            bars = ax.bar(range(len(names)), values, color=[PALETTE[i % len(PALETTE)] for i in range(len(names))])
            ax.bar_label(bars, fmt="%.2f", fontsize=8, color=GREY)
            ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
            ax.set_title(label, fontsize=9)
            ax.grid(axis="y")
        fig.suptitle(title or "")
    return _finish(fig)


# ---------------------------------------------------------------------------------------------------------------
# Comparing methods
# ---------------------------------------------------------------------------------------------------------------


def plot_recall_by_method(summary: dict, title: str | None = None) -> Figure:
    """Fact recall at each checkpoint, one line per method, with the matched-learning target dashed."""
    with theme():
        fig, ax = plt.subplots(figsize=(6.8, 4), layout="constrained")
        for method, points in summary.get("checkpoints", {}).items():
            ax.plot([0] + [p["step"] for p in points], [0.0] + [p["fact_recall"] for p in points], marker="o",
                    lw=1.8, label=LABELS.get(method, method))
        if "target_recall" in summary:
            ax.axhline(summary["target_recall"], color=GREY, ls="--", lw=1)
            ax.text(0, summary["target_recall"], " target (matched learning)", color=GREY, fontsize=8, va="bottom")
        ax.set_ylim(-0.03, 1.08)
        ax.set_xlabel("training step")
        ax.set_ylabel("new-fact recall")
        ax.grid()
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(title or "Learning: recall of the new facts over training")
    return _finish(fig)


def pareto(summary: dict) -> Figure:
    """`report.plot_pareto` in the notebooks' theme (readable on light and dark backgrounds)."""
    with theme():
        fig = plot_pareto(summary)
    return _finish(fig)
