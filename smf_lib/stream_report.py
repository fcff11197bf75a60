"""The stream's figure and table: per method, the retention matrix as a heatmap and the known facts forgotten after
each round as curves; the Markdown table `stream` prints; backward transfer."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .plots import GREY, HEATMAP_CMAP, PALETTE, theme
from .report import LABELS


def backward_transfer(retention: Sequence[Sequence[float]]) -> float:
    """Mean change in each earlier round's recall from right after its round to the end (Lopez-Paz & Ranzato,
    arXiv 1706.08840): 0 keeps everything, negative forgets; 0 for a single round."""
    final = retention[-1]
    earlier = [final[i] - retention[i][i] for i in range(len(retention) - 1)]
    return float(np.mean(earlier)) if earlier else 0.0


def _retention_matrix(retention: Sequence[Sequence[float]]) -> np.ma.MaskedArray:
    """The ragged lower triangle as a square matrix, the cells above the diagonal masked."""
    n = len(retention)
    matrix = np.full((n, n), np.nan)
    for j, row in enumerate(retention):
        matrix[j, : len(row)] = row
    return np.ma.masked_invalid(matrix)


def _heatmap(ax: plt.Axes, retention: Sequence[Sequence[float]], title: str):
    """One method's retention matrix, each cell labelled with its recall."""
    matrix = _retention_matrix(retention)
    image = ax.imshow(matrix, cmap=HEATMAP_CMAP, vmin=0, vmax=1)
    n = len(retention)
    for j in range(n):
        for i in range(j + 1):
            value = float(matrix[j, i])
            ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 else "white")
    ticks = list(range(n))
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel("facts of round")
    ax.set_ylabel("after round")
    ax.set_title(title)
    ax.spines[:].set_visible(False)
    return image


def plot_stream(summary: dict) -> Figure:
    """Per method, the retention heatmap (after round j, recall of round i's facts); last, known facts forgotten
    after each round, one curve per method."""
    methods = summary["methods"]
    with theme():
        fig, axes = plt.subplots(1, len(methods) + 1, figsize=(3.3 * (len(methods) + 1) + 1, 3.6),
                                 layout="constrained", squeeze=False)
        axes = axes[0]
        image = None
        for ax, (method, entry) in zip(axes, methods.items()):
            image = _heatmap(ax, entry["retention"], LABELS.get(method, method))
        if image is not None:
            fig.colorbar(image, ax=list(axes[: len(methods)]), label="fact recall", shrink=0.8)
        curves = axes[-1]
        for color, (method, entry) in zip(PALETTE, methods.items()):
            drops = entry["known_fact_drop_pct"]
            curves.plot(range(1, len(drops) + 1), drops, marker="o", color=color, label=LABELS.get(method, method))
        curves.axhline(0, color=GREY, lw=0.8)
        curves.set_xticks(range(1, summary["rounds"] + 1))
        curves.set_xlabel("after round")
        curves.set_ylabel("known facts forgotten (%)")
        curves.set_title("Forgetting over the stream")
        curves.grid(True)
        if methods:
            curves.legend()
        fig.suptitle(f"Continual learning: {summary['rounds']} rounds of {summary['facts_per_round']} facts "
                     f"({summary['profile']} profile)")
    plt.close(fig)
    return fig


def format_stream(summary: dict) -> str:
    """A Markdown table: recall of each round's facts after the last round, and forgetting after it."""
    lines = ["| method | recall per round, at the end | mean | backward transfer | known-fact drop % | ppl change % "
             "| patch KB/round | recall after reverting round 1 |", "|---|---|---|---|---|---|---|---|"]
    for method, entry in summary["methods"].items():
        final, transfer = entry["retention"][-1], backward_transfer(entry["retention"])
        patch = f"{np.mean(entry['patch_bytes']) / 1024:.1f}" if entry.get("patch_bytes") else "–"
        revert = " ".join(f"{r:.2f}" for r in entry["revert"]["recall_after"]) if "revert" in entry else "–"
        lines.append(f"| {LABELS.get(method, method)} | {' '.join(f'{r:.2f}' for r in final)} | "
                     f"{np.mean(final):.2f} | {transfer:+.2f} | {entry['known_fact_drop_pct'][-1]:.1f} | "
                     f"{entry['ppl_increase_pct'][-1]:+.2f} | {patch} | {revert} |")
    return "\n".join(lines) + "\n"
