"""An ipywidgets inspector: which memory slots does a token read, and how surprising are they?"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import ipywidgets as widgets
import torch
from tqdm.auto import tqdm

from .data import Fact, KnownFact
from .memory import READ_THRESHOLD, SlotAccess
from .plots import token_labels
from .retrofit import memory_layers
from .selection import background_distribution, kl_scores, select_top, token_surprise
from .stats import SlotStats, recording, slot_counts
from .training import TrainConfig

TOP_T = TrainConfig().top_t


@dataclass
class SentenceReads:
    """What one sentence read: token labels and, per memory layer, its slot access and scores.

    The sentence is scored as a batch on its own: `counts` are its soft access counts, `kl` the KL score of each slot,
    `selected` the top-t slots by KL, `surprise` the token surprise (one value per token).
    """

    text: str
    tokens: list[str]
    indices: dict[int, torch.Tensor]   # (seq, heads, topk)
    weights: dict[int, torch.Tensor]   # (seq, heads, topk)
    kl: dict[int, torch.Tensor]        # (n_slots,)
    selected: dict[int, torch.Tensor]  # (n_slots,) bool
    surprise: dict[int, torch.Tensor]  # (seq,)


def _label(text: str, width: int = 100) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


@torch.no_grad()
def read_sentence(model: torch.nn.Module, tokenizer, background: SlotStats, text: str, top_t: int = TOP_T,
                  batch_with: Sequence[str] = ()) -> SentenceReads:
    """Run `text` through a retrofitted model and score what each of its tokens read (see SentenceReads).

    The batch whose usage `p_b` the scores compare with the background is `text` alone, or `text` together with the
    sentences `batch_with` (e.g. to compare two sentences on one footing).
    """
    device = next(model.parameters()).device
    batch = tokenizer([text, *batch_with], return_tensors="pt", padding=True).to(device)
    length = int(batch["attention_mask"][0].sum())
    indices, weights, kl, selected, surprise = {}, {}, {}, {}, {}
    with recording(model) as layers:
        model(**batch)
        counts = slot_counts(model, batch["attention_mask"].bool())
        for m in layers:
            i, c = m.layer_index, counts[m.layer_index].cpu()
            access = SlotAccess(m.last_access.indices[0, :length].cpu(), m.last_access.weights[0, :length].cpu())
            bg = background.counts[i].to(c)
            indices[i], weights[i] = access.indices, access.weights
            kl[i] = kl_scores(c, bg)
            selected[i] = torch.zeros(m.n_slots, dtype=torch.bool)
            selected[i][select_top(kl[i], top_t)] = True
            surprise[i] = token_surprise(access, c, bg)
    tokens = token_labels(tokenizer, batch["input_ids"][0, :length].tolist())
    return SentenceReads(text, tokens, indices, weights, kl, selected, surprise)


class SlotInspector:
    """Pick a sentence (a new fact's training sentence, a known fact, or typed text) and a token; see, per memory
    layer, the slots the token read: index, weight, background frequency p_bg, KL score with the sentence as the
    batch, whether that slot is in the sentence's top-t, and which new facts also read it.

    Display it by leaving it as the last expression of a cell. Controls: `.sentence` (Dropdown), `.text` (Text:
    typed text replaces the dropdown's sentence once submitted), `.token` (Dropdown of token positions); the table
    is `.table` (an HTML widget), its rows are also in `.rows` (per layer, a list of dicts).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, background: SlotStats, facts: Sequence[Fact],
                 known: Sequence[KnownFact] | None = None, top_t: int = TOP_T, max_rows: int = 8,
                 min_weight: float = READ_THRESHOLD, batch_size: int = 32, progress: bool = True) -> None:
        self.model, self.tokenizer, self.background = model, tokenizer, background
        self.layers = memory_layers(model)
        if not self.layers:
            raise ValueError("SlotInspector needs a retrofitted model: call retrofit(model) first.")
        missing = [m.layer_index for m in self.layers if m.layer_index not in background.counts]
        if missing:
            raise ValueError(f"The background statistics have no counts for memory layers {missing}; "
                             "collect them on this model with collect_background(model, ...).")
        self.facts, self.known = list(facts), list(known or [])
        self.top_t, self.max_rows, self.min_weight = top_t, max_rows, min_weight
        self.p_bg = {i: background_distribution(c) for i, c in background.counts.items()}
        self.readers = self._fact_readers(batch_size, progress)
        self.current: SentenceReads | None = None
        self._quiet = False
        self.rows: dict[int, list[dict]] = {}

        options = [(_label(f"{f.id} · {s}"), s) for f in self.facts for s in f.train]
        options += [(_label(f"{k.id} · known · {k.prompt} {k.answer}"), f"{k.prompt} {k.answer}") for k in self.known]
        wide = widgets.Layout(width="98%")
        self.sentence = widgets.Dropdown(options=options, description="Sentence", layout=wide)
        self.text = widgets.Text(description="or type", placeholder="your own sentence, then press Enter",
                                 continuous_update=False, layout=wide)
        self.token = widgets.Dropdown(description="Token", layout=widgets.Layout(width="50%"))
        self.table = widgets.HTML()
        self.widget = widgets.VBox([self.sentence, self.text, self.token, self.table])
        self.sentence.observe(self._on_sentence, names="value")
        self.text.observe(self._on_text, names="value")
        self.token.observe(self._on_token, names="value")
        if options:
            self.analyse(self.sentence.value)

    # --- computing --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _fact_readers(self, batch_size: int, progress: bool) -> dict[int, dict[int, tuple[str, ...]]]:
        """Per layer: slot -> ids of the new facts whose probe or training sentences read it (weight >= min_weight)."""
        sentences, owner = [], []
        for j, fact in enumerate(self.facts):
            for s in (*fact.train, fact.probe):
                sentences.append(s)
                owner.append(j)
        pairs: dict[int, set[tuple[int, int]]] = {m.layer_index: set() for m in self.layers}
        device = next(self.model.parameters()).device
        starts = range(0, len(sentences), batch_size)
        with recording(self.model):
            for start in tqdm(starts, desc="slots read by the new facts", disable=not progress or not sentences):
                batch = self.tokenizer(sentences[start:start + batch_size], return_tensors="pt",
                                       padding=True).to(device)
                self.model(**batch)
                mask = batch["attention_mask"].bool().cpu()
                rows = torch.tensor(owner[start:start + batch_size])[:, None].expand_as(mask)
                for m in self.layers:
                    idx, w = m.last_access.indices.cpu(), m.last_access.weights.cpu()
                    who = rows[:, :, None, None].expand_as(idx)
                    keep = mask[:, :, None, None].expand_as(idx) & (w >= self.min_weight)
                    keys = torch.unique(idx[keep] * len(self.facts) + who[keep])
                    pairs[m.layer_index].update(divmod(int(k), len(self.facts)) for k in keys)
        readers: dict[int, dict[int, tuple[str, ...]]] = {}
        for layer, found in pairs.items():
            by_slot: dict[int, list[str]] = {}
            for slot, j in sorted(found):
                by_slot.setdefault(slot, []).append(self.facts[j].id)
            readers[layer] = {slot: tuple(ids) for slot, ids in by_slot.items()}
        return readers

    def analyse(self, text: str) -> SentenceReads:
        """Score `text` as a batch on its own, refill the token list and show the most surprising token."""
        self.current = read_sentence(self.model, self.tokenizer, self.background, text, self.top_t)
        tokens, surprise = self.current.tokens, self.current.surprise
        mean_surprise = torch.stack([s for s in surprise.values()]).mean(0)
        options = [(f"{p}: {t!r}", p) for p, t in enumerate(tokens)]
        self._quiet = True  # one render below, not one per option/value change
        try:
            self.token.options = options
            self.token.value = int(mean_surprise.argmax())
        finally:
            self._quiet = False
        self.render()
        return self.current

    def slots(self, position: int) -> dict[int, list[dict]]:
        """Per layer, the slots the token at `position` read: summed weight over heads (divided by the number of
        heads, so a token's weights sum to 1 per layer), highest first, at most `max_rows` above `min_weight`."""
        reads = self.current
        if reads is None:
            raise RuntimeError("No sentence analysed yet.")
        table = {}
        for m in self.layers:
            i = m.layer_index
            idx, w = reads.indices[i][position].reshape(-1), reads.weights[i][position].reshape(-1).double() / m.heads
            slots, inverse = torch.unique(idx, return_inverse=True)
            total = torch.zeros(len(slots), dtype=torch.float64).index_add_(0, inverse, w)
            order = total.argsort(descending=True)
            keep = [int(o) for o in order[: self.max_rows] if total[o] >= self.min_weight] or [int(order[0])]
            table[i] = [{"slot": int(slots[o]), "weight": float(total[o]), "p_bg": float(self.p_bg[i][slots[o]]),
                         "kl": float(reads.kl[i][slots[o]]), "selected": bool(reads.selected[i][slots[o]]),
                         "facts": self.readers.get(i, {}).get(int(slots[o]), ())} for o in keep]
        return table

    # --- showing ----------------------------------------------------------------------------------------------

    def render(self) -> None:
        """Refill the table for the current sentence and token."""
        if self.current is None or self.token.value is None:
            return
        p = int(self.token.value)
        self.rows = self.slots(p)
        reads = self.current
        cell = "padding:2px 10px;border-bottom:1px solid rgba(128,128,128,0.35);text-align:right"
        head = "padding:2px 10px;border-bottom:1px solid rgba(128,128,128,0.8);text-align:right"
        parts = [f"<div style='font-family:sans-serif;font-size:13px'>"
                 f"<p>Token <b>{p}: {html.escape(repr(reads.tokens[p]))}</b> in "
                 f"“{html.escape(reads.text)}”<br><span style='opacity:0.75'>KL scores and top-{self.top_t} "
                 f"with this sentence as the batch; weights summed over heads; new facts that read a slot with "
                 f"weight ≥ {self.min_weight:g}</span></p>"]
        for layer, rows in self.rows.items():
            parts.append(f"<p style='margin:10px 0 2px'><b>layer {layer}</b> · token surprise "
                         f"{float(reads.surprise[layer][p]):.2f} nats</p>")
            parts.append("<table style='border-collapse:collapse'><tr>" + "".join(
                f"<th style='{head}'>{h}</th>" for h in ("slot", "weight", "p_bg", "KL score", f"top-{self.top_t}",
                                                          "new facts reading it")) + "</tr>")
            for r in rows:
                facts = ", ".join(r["facts"][:6]) + (f" +{len(r['facts']) - 6} more" if len(r["facts"]) > 6 else "")
                mark = "background-color:rgba(47,174,143,0.18)" if r["selected"] else ""
                parts.append(
                    f"<tr style='{mark}'><td style='{cell}'>{r['slot']}</td><td style='{cell}'>{r['weight']:.3f}</td>"
                    f"<td style='{cell}'>{r['p_bg']:.2e}</td><td style='{cell}'>{r['kl']:.4f}</td>"
                    f"<td style='{cell};text-align:center'>{'✓' if r['selected'] else '–'}</td>"
                    f"<td style='{cell};text-align:left'>{html.escape(facts) or '–'}</td></tr>")
            parts.append("</table>")
        parts.append("</div>")
        self.table.value = "".join(parts)

    def _on_sentence(self, change) -> None:
        if change["new"] is not None:
            self.analyse(change["new"])

    def _on_text(self, change) -> None:
        if change["new"].strip():
            self.analyse(change["new"].strip())

    def _on_token(self, change) -> None:
        if change["new"] is not None and not self._quiet:
            self.render()

    def display(self) -> None:
        """Show the inspector (outside the last line of a cell)."""
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
