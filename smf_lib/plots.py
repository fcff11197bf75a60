"""Figures for the notebooks. Every `plot_*` function returns its matplotlib Figure.

Figures have a transparent background and mid-grey text, axes and grid, so they read on light and dark
notebook themes alike; data colours are mid-bright. Sections:

- theme and small helpers
- product-key memory: how one token finds its slots
- slot usage and slot scores
- token surprise
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import matplotlib.pyplot as plt
import numpy as np
import torch
from cycler import cycler
from matplotlib.figure import Figure

from .memory import READ_THRESHOLD, ProductKeyMemory
from .stats import SlotStats, capture_inputs

# ---------------------------------------------------------------------------------------------------------------
# Theme and small helpers
# ---------------------------------------------------------------------------------------------------------------

GREY = "#8c8c8c"
PALETTE = ["#3b8ed8", "#f28e2b", "#2fae8f", "#e15759", "#a77bd8", "#d4a72c"]
BLUE, ORANGE, GREEN, RED, PURPLE, YELLOW = PALETTE
HEATMAP_CMAP = "viridis"

_RC = {
    "figure.facecolor": "none", "axes.facecolor": "none",
    "savefig.facecolor": "none", "savefig.transparent": True,
    "text.color": GREY, "axes.labelcolor": GREY, "axes.titlecolor": GREY, "axes.edgecolor": GREY,
    "xtick.color": GREY, "ytick.color": GREY, "xtick.labelcolor": GREY, "ytick.labelcolor": GREY,
    "grid.color": GREY, "grid.alpha": 0.25, "grid.linewidth": 0.6,
    "axes.spines.top": False, "axes.spines.right": False,
    "legend.frameon": False, "legend.labelcolor": GREY,
    "font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold", "figure.titlesize": 12,
    "figure.dpi": 100, "axes.prop_cycle": cycler(color=PALETTE),
}


@contextmanager
def theme() -> Iterator[None]:
    """The figures' style: transparent background, mid-grey text and spines that read on light and dark themes."""
    with plt.rc_context(_RC):
        yield


def _finish(fig: Figure) -> Figure:
    """Detach the figure from pyplot so a notebook shows it once: as the cell's value, not also at the cell's end."""
    plt.close(fig)
    return fig


def token_labels(tokenizer, input_ids: Sequence[int]) -> list[str]:
    """Readable token strings: each id decoded on its own, a leading space shown as `·`, a newline as `⏎`."""
    labels = []
    for i in input_ids:
        piece = tokenizer.decode([int(i)])
        if piece.startswith(" "):
            piece = "·" + piece[1:]
        labels.append(piece.replace("\n", "⏎") or "∅")
    return labels


@torch.no_grad()
def memory_inputs(model: torch.nn.Module, tokenizer, text: str) -> tuple[list[str], dict[int, torch.Tensor]]:
    """Run `text` through a retrofitted model; return its token labels and, per memory layer, the layer's input
    (seq, dim): the vectors each memory turns into queries."""
    batch = tokenizer([text], return_tensors="pt").to(next(model.parameters()).device)
    with capture_inputs(model, keep=lambda x: x[0].detach().float().cpu()) as captured:
        model(**batch)
    return token_labels(tokenizer, batch["input_ids"][0].tolist()), {i: x[0] for i, x in captured.items()}


# ---------------------------------------------------------------------------------------------------------------
# Product-key memory: how one token finds its slots
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _sub_scores(memory: ProductKeyMemory, x: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves' sub-key scores (n_keys each) of one token and head."""
    s1, s2 = memory.sub_key_scores(x.reshape(-1, memory.dim)[:1].to(memory.query.weight))
    return s1[0, head].float().cpu(), s2[0, head].float().cpu()


def plot_product_keys(memory: ProductKeyMemory, x: torch.Tensor, head: int = 0, title: str | None = None) -> Figure:
    """How one token (`x`: the memory layer's input, shape (dim,)) finds its top-k slots for one `head`.

    Top: the query's scores against the n_keys sub-keys of each half, their top-k marked. Bottom left: the k x k grid
    of candidate sums (rows: half 1's top-k, columns: half 2's top-k, both sorted), with the k chosen slots marked.
    Bottom right: the softmax weights the chosen slots receive.
    """
    s1, s2 = _sub_scores(memory, x, head)
    k, n = memory.topk, memory.n_keys
    top1, idx1 = s1.topk(k)
    top2, idx2 = s2.topk(k)
    grid = top1[:, None] + top2[None, :]
    scores, best = grid.flatten().topk(k)
    rows, cols = best // k, best % k
    chosen = idx1[rows] * n + idx2[cols]
    reference = memory.lookup(x.reshape(-1, memory.dim)[:1].to(memory.query.weight))[1][0, head].cpu()
    if sorted(chosen.tolist()) != sorted(reference.tolist()):  # the figure must show what the layer really does
        raise AssertionError("plot_product_keys disagrees with ProductKeyMemory.lookup; update _sub_scores.")
    weights = torch.softmax(scores / memory.temperature, dim=-1)

    with theme():
        fig = plt.figure(figsize=(11, 7.2), layout="constrained")
        spec = fig.add_gridspec(2, 2, height_ratios=[1, 1.5], width_ratios=[1.25, 1])
        for col, (s, idx, colour, name) in enumerate([(s1, idx1, BLUE, "first"), (s2, idx2, ORANGE, "second")]):
            ax = fig.add_subplot(spec[0, col])
            ax.bar(np.arange(n), s.numpy(), width=1.0, color=GREY, alpha=0.45, label="all sub-keys")
            ax.bar(idx.numpy(), s[idx].numpy(), width=1.0, color=colour, label=f"top-{k}")
            ax.set_title(f"{name} half: scores $q_{col + 1}\\cdot c^{{({col + 1})}}_j$ of {n} sub-keys")
            ax.set_xlabel("sub-key index $j$")
            ax.set_xlim(-1, n)
            ax.legend(loc="best", fontsize=8)
        ax = fig.add_subplot(spec[1, 0])
        im = ax.imshow(grid.numpy(), cmap=HEATMAP_CMAP, aspect="equal")
        ax.scatter(cols.numpy(), rows.numpy(), s=22, facecolors="none", edgecolors="white", linewidths=1.3)
        ax.scatter(cols.numpy(), rows.numpy(), s=4, color=RED)
        ax.set_title(f"{k}×{k} candidate sums; ○ = the top-{k} slots")
        ax.set_ylabel(f"rank in first half's top-{k}")
        ax.set_xlabel(f"rank in second half's top-{k}")
        bar = fig.colorbar(im, ax=ax, shrink=0.85)
        bar.set_label("score $q\\cdot k_{ij}$")
        bar.outline.set_edgecolor(GREY)
        ax = fig.add_subplot(spec[1, 1])
        ax.bar(np.arange(k), weights.numpy(), color=GREEN)
        ax.set_title(f"softmax weights of the {k} chosen slots (τ = {memory.temperature:g})")
        ax.set_xlabel("chosen slot, by score")
        ax.set_ylabel("weight")
        ax.grid(axis="y")
        top = int(weights.argmax())
        ax.annotate(f"slot {int(chosen[top]):,}\n= ({int(idx1[rows[top]])}, {int(idx2[cols[top]])})",
                    xy=(top, float(weights[top])), xytext=(max(k * 0.35, 2), float(weights[top]) * 0.75),
                    arrowprops={"arrowstyle": "->", "color": GREY})
        fig.suptitle(title or f"Product keys: {n}² = {n * n:,} slots, found by scoring 2×{n} sub-keys and "
                     f"{k}×{k} = {k * k:,} candidate pairs (head {head})")
    return _finish(fig)


# ---------------------------------------------------------------------------------------------------------------
# Slot usage and slot scores
# ---------------------------------------------------------------------------------------------------------------

def _as_mapping(stats: SlotStats | Mapping[str, SlotStats]) -> dict[str, SlotStats]:
    return {"": stats} if isinstance(stats, SlotStats) else dict(stats)


def usage_summary(stats: SlotStats | Mapping[str, SlotStats]) -> str:
    """A text table per layer (and per labelled statistics): tokens, slots read, effective number of slots
    (exp of the usage entropy) and the share of all reads that goes to the busiest 1% of slots."""
    lines = [f"{'':14} {'layer':>5} {'tokens':>7} {'slots read':>11} {'effective slots':>16} {'top-1% share':>13}"]
    for label, s in _as_mapping(stats).items():
        for layer, c in sorted(s.counts.items()):
            c = c.double()
            p = c / c.sum()
            entropy = -(p[p > 0] * p[p > 0].log()).sum()
            top = c.sort(descending=True).values[: max(1, len(c) // 100)].sum() / c.sum()
            lines.append(f"{label[:14]:14} {layer:>5} {s.n_tokens:>7,} {int((c >= READ_THRESHOLD).sum()):>11,} "
                         f"{float(entropy.exp()):>16,.0f} {float(top):>12.1%}")
    return "\n".join(lines)


def plot_slot_usage(stats: SlotStats | Mapping[str, SlotStats], layer: int | None = None,
                    title: str | None = None) -> Figure:
    """How skewed slot usage is: each slot's share of all reads, sorted, on log-log axes.

    `stats` is one SlotStats or several by label (e.g. before/after calibration); `layer=None` draws every layer.
    A flat line would be perfectly even use; the dashed line marks that level (1/N).
    """
    named = _as_mapping(stats)
    first = next(iter(named.values()))
    layers = sorted(first.counts) if layer is None else [layer]
    with theme():
        fig, ax = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
        styles = ["-", "--", ":", "-."]
        for j, (label, s) in enumerate(named.items()):
            for i, li in enumerate(layers):
                c = s.counts[li].double()
                share = (c / c.sum()).sort(descending=True).values
                share = share[c.sort(descending=True).values >= READ_THRESHOLD].numpy()
                top = float(share[: max(1, len(c) // 100)].sum())
                name = " ".join(x for x in (label, f"layer {li}") if x)
                colour = PALETTE[i % len(PALETTE)] if len(named) == 1 else PALETTE[j % len(PALETTE)]
                style = styles[0] if len(named) == 1 else styles[i % len(styles)]
                ax.loglog(np.arange(1, len(share) + 1), share, style, color=colour, lw=1.6,
                          label=f"{name}: busiest 1% of slots get {top:.0%}")
        n_slots = len(first.counts[layers[0]])
        ax.axhline(1 / n_slots, color=GREY, ls="--", lw=1)
        ax.text(1.2, 1 / n_slots * 1.25, f"even use of all {n_slots:,} slots", color=GREY, fontsize=8)
        ax.set_xlabel("slot rank (busiest first)")
        ax.set_ylabel("share of all reads")
        ax.grid(which="major")
        ax.legend(fontsize=8, loc="upper right")
        ax.set_title(title or f"Slot usage on {first.n_tokens:,} background tokens")
    return _finish(fig)


def plot_scores(kl: torch.Tensor, tfidf: torch.Tensor, counts: torch.Tensor, top_t: int = 2000,
                title: str | None = None) -> Figure:
    """KL against TF-IDF score of every slot the batch read (one layer), with each score's top-t marked.

    Axes are symmetric-log: KL is negative for slots the batch uses less often than background text does.
    Slots with less than READ_THRESHOLD total weight are left out (they carry no gradient either way).
    """
    kl, tfidf, counts = kl.double().cpu(), tfidf.double().cpu(), counts.double().cpu()
    read = (counts >= READ_THRESHOLD) & torch.isfinite(kl) & torch.isfinite(tfidf)
    from .selection import select_top  # local: plots stays importable on its own

    in_kl = torch.zeros_like(read)
    in_kl[select_top(kl, top_t)] = True
    in_tf = torch.zeros_like(read)
    in_tf[select_top(tfidf, top_t)] = True
    groups = [("neither", ~in_kl & ~in_tf, GREY, 0.35), (f"TF-IDF top-{top_t} only", ~in_kl & in_tf, ORANGE, 0.8),
              (f"KL top-{top_t} only", in_kl & ~in_tf, BLUE, 0.8), ("both", in_kl & in_tf, GREEN, 0.6)]
    with theme():
        fig, ax = plt.subplots(figsize=(7.5, 5.2), layout="constrained")
        for name, mask, colour, alpha in groups:
            mask = mask & read
            ax.scatter(tfidf[mask].numpy(), kl[mask].numpy(), s=9, color=colour, alpha=alpha, lw=0,
                       label=f"{name} ({int(mask.sum()):,})")
        finite = torch.cat([kl[read].abs(), tfidf[read].abs()])
        linthresh = float(finite[finite > 0].quantile(0.05)) if (finite > 0).any() else 1e-6
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.axhline(0, color=GREY, lw=0.8)
        ax.set_xlabel("TF-IDF score  $p_b(i)\\,\\log\\frac{B+1}{df(i)+1}$")
        ax.set_ylabel("KL score  $p_b(i)\\,\\log\\frac{p_b(i)}{p_{bg}(i)}$")
        ax.grid()
        ax.legend(fontsize=8, loc="lower right", markerscale=2)
        ax.set_title(title or f"Slot scores of one batch ({int(read.sum()):,} slots read)")
    return _finish(fig)


# ---------------------------------------------------------------------------------------------------------------
# Token surprise
# ---------------------------------------------------------------------------------------------------------------


def _surprise_matrix(surprise_by_layer: Mapping[int, torch.Tensor]) -> tuple[list[int], np.ndarray]:
    layers = sorted(surprise_by_layer)
    return layers, np.stack([surprise_by_layer[i].double().cpu().reshape(-1).numpy() for i in layers], axis=1)


def plot_surprise_heatmap(tokens: Sequence[str], surprise_by_layer: Mapping[int, torch.Tensor],
                          title: str | None = None, ax=None, vmin: float | None = None, vmax: float | None = None,
                          colorbar: bool = True) -> Figure:
    """Token surprise (`selection.token_surprise`) as a heatmap: one row per token, one column per memory layer.

    Bright cells are tokens that lean on slots their batch uses far more often than background text does.
    """
    import seaborn as sns

    layers, matrix = _surprise_matrix(surprise_by_layer)
    if matrix.shape[0] != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but surprise for {matrix.shape[0]} positions.")
    with theme():
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(1.2 * len(layers) + 2.5, 0.28 * len(tokens) + 1.4), layout="constrained")
        else:
            fig = ax.figure
        sns.heatmap(matrix, ax=ax, cmap=HEATMAP_CMAP, vmin=vmin, vmax=vmax, cbar=colorbar,
                    xticklabels=[f"layer {i}" for i in layers], yticklabels=list(tokens),
                    cbar_kws={"label": "token surprise (nats)"} if colorbar else None)
        ax.set_box_aspect(0.3 * len(tokens) / len(layers))  # the same cell shape in every panel
        ax.tick_params(axis="y", rotation=0, labelsize=9)
        ax.tick_params(axis="x", rotation=0)
        if title:
            ax.set_title(title)
    return _finish(fig) if own else fig


def plot_surprise_comparison(panels: Sequence[tuple[str, Sequence[str], Mapping[int, torch.Tensor]]]) -> Figure:
    """Several sentences' token-surprise heatmaps side by side on one colour scale: `panels` = (title, tokens,
    surprise_by_layer) each."""
    values = np.concatenate([_surprise_matrix(s)[1].ravel() for _, _, s in panels])
    vmin, vmax = float(values.min()), float(values.max())
    longest = max(len(t) for _, t, _ in panels)
    with theme():
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 0.28 * longest + 1.6),
                                 layout="constrained", squeeze=False)
        for j, (ax, (name, tokens, surprise)) in enumerate(zip(axes[0], panels)):
            plot_surprise_heatmap(tokens, surprise, title=name, ax=ax, vmin=vmin, vmax=vmax,
                                  colorbar=j == len(panels) - 1)
    return _finish(fig)
