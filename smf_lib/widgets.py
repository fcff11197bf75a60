"""An ipywidgets inspector: which memory slots the tokens of a training batch read, which of them a training step
selects, who else reads them (other new facts, known facts) and, after training, how far each row moved."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import ipywidgets as widgets
import torch
from tqdm.auto import tqdm

from .analysis import Before, changed_rows, row_moves
from .batches import Example, build_examples, collate
from .data import Fact, KnownFact
from .evaluation import complete, contains_answer
from .memory import READ_THRESHOLD, SlotAccess
from .models import pad_id
from .plots import token_labels
from .reads import SCORE_NAMES, forward_reads, parameters_of, score_batch
from .retrofit import memory_layers
from .selection import background_distribution, token_surprise
from .stats import SlotStats
from .training import TrainConfig

DEFAULT_BATCH_FACTS = 4


@dataclass(frozen=True)
class Text:
    """A sentence the inspector knows: a new fact's training sentence or a known fact's prompt.

    `prompt` is what a model completes in before/after mode (a training sentence up to its answer, the fact's probe
    when the sentence opens with its answer, or the known prompt), `answers` what counts as recalling it.
    """

    text: str
    source: str                # the fact's id
    known: bool                # a known fact's prompt (else a new fact's training sentence)
    prompt: str
    answers: tuple[str, ...]


def _label(text: str, width: int = 100) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _chip_colour(surprise: float, scale: float) -> str:
    """Orange for slots read more than background text reads them, blue for less, white for as often."""
    x = max(-1.0, min(1.0, surprise / scale))
    target = (230, 97, 1) if x >= 0 else (33, 102, 172)
    mix = 0.8 * abs(x)  # never fully saturated, so the black label stays readable
    return "#" + "".join(f"{round(255 + (c - 255) * mix):02x}" for c in target)


CELL = "padding:2px 8px;border-bottom:1px solid rgba(128,128,128,0.35);text-align:right;vertical-align:top"
HEAD = "padding:2px 8px;border-bottom:1px solid rgba(128,128,128,0.8);text-align:right"


class SlotInspector:
    """Explore a training batch slot by slot, as the trainer sees it.

    The batch is the training sentences of `batch` (default: the first four of `facts`), tokenised, padded and
    scored as one `train` step with `config` scores it: slot reads counted at `counted_positions(batch,
    config.count_on)`, KL (or TF-IDF) scores against `background`, top-`config.top_t` rows per layer. Pick a sentence
    (the batch's, or a known fact's prompt), click a token chip (coloured by token surprise, underlined where the
    trainer counts), and see per memory layer the slots that token reads: weight, p_bg, p_b, score, whether the step
    selects the row, and who else reads it: training sentences of `facts` and prompts of `known` facts (the
    forgetting risk). With `before` (the untrained model or `snapshot(model)` taken before training) the table also
    says whether each row was trained and how far it moved, and shows the sentence's greedy completion before and
    after. Reads and scores are those of `model` as it is now.

    Controls: `.sentence` (Dropdown of text indices), `.chip_buttons` (one Button per token, `.click()` them);
    output: `.table` (HTML) and `.rows` (per layer, a list of dicts). Display it as a cell's last expression.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, background: SlotStats, facts: Sequence[Fact],
                 config: TrainConfig | None = None, *, batch: Sequence[Fact] | None = None,
                 known: Sequence[KnownFact] = (), before: Before | None = None, max_rows: int = 8,
                 min_weight: float = READ_THRESHOLD, examples: int = 2, chunk_size: int = 32,
                 progress: bool = True) -> None:
        self.model, self.tokenizer, self.background = model, tokenizer, background
        self.config = config or TrainConfig()
        self.layers = memory_layers(model)
        self._check(background)
        self.batch_facts = list(facts[:DEFAULT_BATCH_FACTS] if batch is None else batch)
        ids = {f.id for f in self.batch_facts}
        self.facts = self.batch_facts + [f for f in facts if f.id not in ids]
        self.known = list(known)
        self.max_rows, self.min_weight, self.examples = max_rows, min_weight, examples
        self.p_bg = {i: background_distribution(c) for i, c in background.counts.items()}

        self.scores = score_batch(model, tokenizer, background, self.batch_facts, self.config)
        self.selected = {i: torch.zeros(m.n_slots, dtype=torch.bool) for i, m in self._by_layer()}
        for i, rows in self.scores.selected.items():
            self.selected[i][rows] = True
        self.texts: list[Text] = []
        self.access: list[dict[int, SlotAccess]] = []  # per text, per layer: (seq, heads, topk)
        self.input_ids: list[list[int]] = []
        self._keys: dict[int, list[torch.Tensor]] = {m.layer_index: [] for m in self.layers}
        self._scan(chunk_size, progress)
        self.n_batch = len(self.scores.batch["input_ids"])
        self.surprise = [self._surprise(j) for j in range(len(self.texts))]
        scale = max((abs(s) for j in range(self.n_batch) for s in self.surprise[j]), default=0.0)
        self.scale = max(scale, 1e-9)  # one colour scale for every sentence, fixed by the batch's tokens

        self.before = before
        self.moved = row_moves(before, model) if before is not None else None
        self.trained = None
        if before is not None:
            self.trained = {i: torch.zeros(m.n_slots, dtype=torch.bool) for i, m in self._by_layer()}
            for i, rows in changed_rows(before, model).items():
                self.trained[i][rows] = True
        self._completions: dict[int, tuple[str, str]] = {}

        self.text_index, self.position = 0, 0
        self.rows: dict[int, list[dict]] = {}
        self._build_widgets()
        self.show_text(0)


    def _check(self, background: SlotStats) -> None:
        if not self.layers:
            raise ValueError("SlotInspector needs a retrofitted model: call retrofit(model) first.")
        missing = [m.layer_index for m in self.layers if m.layer_index not in background.counts]
        if missing:
            raise ValueError(f"The background statistics have no counts for memory layers {missing}; "
                             "collect them on this model with collect_background(model, ...).")
        if self.config.method not in SCORE_NAMES:
            raise ValueError(f"The inspector shows the selection of {' or '.join(SCORE_NAMES)}; "
                             f"config.method is {self.config.method!r}.")

    def _by_layer(self):
        return [(m.layer_index, m) for m in self.layers]

    def _texts(self) -> tuple[list[Example], list[Text]]:
        """Every sentence to scan, the batch's first (in batch order): tokenised as training tokenises them."""
        examples, texts = [], []
        for fact in self.facts:
            examples += build_examples([fact], self.tokenizer, self.config.max_length)
            for s in fact.train:
                # what precedes the answer; a sentence that opens with it (or lacks it) is asked the fact's probe
                cut = s.rfind(fact.answer)
                prompt = s[:cut].rstrip() if cut > 0 else fact.probe
                texts.append(Text(s, fact.id, False, prompt, (fact.answer,)))
        for k in self.known:
            ids = self.tokenizer(k.prompt, truncation=True, max_length=self.config.max_length)["input_ids"]
            examples.append(Example(ids, [False] * len(ids), [False] * len(ids)))
            texts.append(Text(k.prompt, k.id, True, k.prompt, k.answers()))
        return examples, texts

    @torch.no_grad()
    def _scan(self, chunk_size: int, progress: bool) -> None:
        """Record what every sentence reads: the batch from its scored forward, the others `chunk_size` at a time."""
        examples, self.texts = self._texts()
        self.input_ids = [e.input_ids for e in examples]
        n_batch = len(self.scores.batch["input_ids"])
        self._record(self.scores.access, self.scores.batch["attention_mask"], 0)
        device = next(self.model.parameters()).device
        starts = range(n_batch, len(examples), chunk_size)
        for start in tqdm(starts, desc="slots read by facts and known facts", disable=not progress or not starts):
            chunk = collate(examples[start:start + chunk_size], pad_id(self.tokenizer), device)
            access = forward_reads(self.model, chunk)
            self._record({i: SlotAccess(a.indices.cpu(), a.weights.cpu()) for i, a in access.items()},
                         chunk["attention_mask"].cpu(), start)
        n = len(self.texts)
        self.readers = {i: torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.long)
                        for i, keys in self._keys.items()}
        self._n_texts = n

    def _record(self, access: dict[int, SlotAccess], mask: torch.Tensor, first: int) -> None:
        """Keep each row's reads, and the (slot, text) pairs where some token reads the slot with weight >= min_weight
        (summed over heads, divided by their number: as the table shows a token's weight)."""
        lengths = mask.sum(1).tolist()
        for r, length in enumerate(lengths):
            self.access.append({i: SlotAccess(a.indices[r, :length], a.weights[r, :length])
                                for i, a in access.items()})
        n_texts = len(self.input_ids)
        text_of = (torch.arange(len(lengths)) + first)[:, None].expand_as(mask)[mask.bool()]
        for i, m in self._by_layer():
            idx, w = access[i].indices[mask.bool()], access[i].weights[mask.bool()].double() / m.heads
            token = torch.arange(len(idx))[:, None, None].expand_as(idx)
            pairs, inverse = torch.unique((token * m.n_slots + idx).reshape(-1), return_inverse=True)
            total = torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, inverse, w.reshape(-1))
            strong = pairs[total >= self.min_weight]
            slot, text = strong % m.n_slots, text_of[strong // m.n_slots]
            self._keys[i].append(torch.unique(slot * n_texts + text))

    def _surprise(self, j: int) -> list[float]:
        """Token surprise of text `j` against the batch's counts, averaged over the memory layers."""
        per_layer = [token_surprise(self.access[j][i], self.scores.counts[i], self.background.counts[i])
                     for i, _ in self._by_layer()]
        return torch.stack(per_layer).mean(0).tolist()

    def counted(self, j: int) -> list[bool]:
        """Which tokens of text `j` the trainer counts (none outside the batch)."""
        if j >= self.n_batch:
            return [False] * len(self.input_ids[j])
        return self.scores.positions[j, : len(self.input_ids[j])].tolist()

    def readers_of(self, layer: int, slot: int) -> tuple[list[int], list[int]]:
        """Indices (into `.texts`) of the new facts' training sentences and of the known prompts that read `slot`."""
        keys, n = self.readers[layer], self._n_texts
        lo, hi = torch.searchsorted(keys, torch.tensor([slot * n, (slot + 1) * n])).tolist()
        texts = (keys[lo:hi] - slot * n).tolist()
        return [t for t in texts if not self.texts[t].known], [t for t in texts if self.texts[t].known]

    def slots(self, j: int, position: int) -> dict[int, list[dict]]:
        """Per layer, the slots token `position` of text `j` reads: weight summed over heads (divided by their number,
        so a token's weights sum to 1 per layer), highest first, at most `max_rows` of weight >= `min_weight` (at
        least the strongest one)."""
        if not 0 <= j < len(self.texts) or not 0 <= position < len(self.input_ids[j]):
            raise IndexError(f"No token {position} in text {j}.")
        table = {}
        for i, m in self._by_layer():
            access = self.access[j][i]
            idx, w = access.indices[position].reshape(-1), access.weights[position].reshape(-1).double() / m.heads
            slots, inverse = torch.unique(idx, return_inverse=True)
            total = torch.zeros(len(slots), dtype=torch.float64).index_add_(0, inverse, w)
            order = total.argsort(descending=True, stable=True)
            keep = [int(o) for o in order[: self.max_rows] if total[o] >= self.min_weight] or [int(order[0])]
            table[i] = [self._row(i, int(slots[o]), float(total[o])) for o in keep]
        return table

    def _row(self, layer: int, slot: int, weight: float) -> dict:
        counts = self.scores.counts[layer]
        new, known = self.readers_of(layer, slot)
        row = {"slot": slot, "weight": weight, "p_bg": float(self.p_bg[layer][slot]),
               "p_b": float(counts[slot] / counts.sum().clamp_min(1e-12)),
               "score": float(self.scores.scores[layer][slot]), "selected": bool(self.selected[layer][slot]),
               "new": new, "known": known}
        if self.trained is not None:
            row |= {"trained": bool(self.trained[layer][slot]), "moved": float(self.moved[layer][slot])}
        return row

    def completions(self, j: int) -> tuple[str, str]:
        """Greedy completions of text `j`'s prompt with the model before training and now (before/after mode)."""
        if self.before is None:
            raise RuntimeError("No `before` given: pass the untrained model or snapshot(model) for before/after mode.")
        if j not in self._completions:
            prompt = [self.texts[j].prompt]
            if isinstance(self.before, torch.nn.Module):
                old = complete(self.before, self.tokenizer, prompt)[0]
            else:
                with parameters_of(self.model, self.before):
                    old = complete(self.model, self.tokenizer, prompt)[0]
            self._completions[j] = (old, complete(self.model, self.tokenizer, prompt)[0])
        return self._completions[j]


    def _build_widgets(self) -> None:
        options = [(_label(f"{'known' if t.known else 'batch' if j < self.n_batch else 'fact'} · {t.source} · "
                           f"{t.text}"), j) for j, t in enumerate(self.texts) if j < self.n_batch or t.known]
        self.sentence = widgets.Dropdown(options=options, value=0, description="Sentence",
                                         layout=widgets.Layout(width="98%"))
        self.summary = widgets.HTML(self._summary())
        self.legend = widgets.HTML(
            "<div style='font-family:sans-serif;font-size:12px;opacity:0.8'>Chip colour: token surprise "
            "(<span style='background:#e97a2a'>&nbsp;orange&nbsp;</span>: the token reads slots this batch uses more "
            "often than background text does; <span style='background:#5d87bd'>&nbsp;blue&nbsp;</span>: less); "
            "<u>underlined</u>: a position the trainer counts; framed: the token shown below. Click a chip.</div>")
        self.chips = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.chip_buttons: list[widgets.Button] = []
        self.table = widgets.HTML()
        self.widget = widgets.VBox([self.summary, self.sentence, self.legend, self.chips, self.table])
        self.sentence.observe(self._on_sentence, names="value")

    def _summary(self) -> str:
        c, s = self.config, self.scores
        chosen = ", ".join(f"layer {i}: {len(r)}" for i, r in s.selected.items())
        return (f"<div style='font-family:sans-serif;font-size:13px'><b>Batch</b>: {len(s.batch['input_ids'])} "
                f"training sentences of {', '.join(html.escape(f.id) for f in self.batch_facts)}; slot reads counted "
                f"at {int(s.positions.sum())} positions (count_on={c.count_on!r}); {SCORE_NAMES[c.method]} scores; "
                f"top-{c.top_t} rows selected per layer ({chosen}). Readers: {self._n_texts - len(self.known)} "
                f"training sentences of {len(self.facts)} new facts, {len(self.known)} known-fact prompts.</div>")

    def show_text(self, j: int, position: int | None = None) -> None:
        """Show text `j` as chips and the slots of token `position` (default: its most surprising counted token)."""
        self.text_index = j
        counted, surprise = self.counted(j), self.surprise[j]
        if position is None:
            candidates = [p for p, c in enumerate(counted) if c] or range(len(surprise))
            position = max(candidates, key=surprise.__getitem__)
        labels = token_labels(self.tokenizer, self.input_ids[j])
        self.chip_buttons = []
        for p, (label, s) in enumerate(zip(labels, surprise)):
            chip = widgets.Button(description=label, tooltip=f"token {p}: surprise {s:.2f} nats"
                                  + (", counted by the trainer" if counted[p] else ""),
                                  layout=widgets.Layout(width="auto", margin="1px", padding="0 4px"))
            chip.style.button_color = _chip_colour(s, self.scale)
            chip.style.text_decoration = "underline" if counted[p] else "none"
            chip.on_click(partial(self._on_chip, p))  # the position travels with the callback
            self.chip_buttons.append(chip)
        self.chips.children = tuple(self.chip_buttons)
        if self.sentence.value != j:
            self.sentence.value = j  # its observer returns at once: this text is already shown
        self.show_token(position)

    def show_token(self, position: int) -> None:
        """Frame chip `position` and fill the table with the slots that token reads."""
        self.rows = self.slots(self.text_index, position)
        for p, chip in enumerate(self.chip_buttons):
            chip.layout.border = "2px solid #222" if p == position else "2px solid transparent"
        self.position = position
        self.table.value = self._render()

    def _render(self) -> str:
        j, p = self.text_index, self.position
        text, label = self.texts[j], token_labels(self.tokenizer, [self.input_ids[j][p]])[0]
        where = ("a known fact's prompt, not in the batch" if text.known else
                 "in the batch" + (", counted by the trainer" if self.counted(j)[p] else ", not counted"))
        parts = [f"<div style='font-family:sans-serif;font-size:13px'><p>Token <b>{p}: "
                 f"{html.escape(repr(label))}</b> of “{html.escape(text.text)}” ({html.escape(text.source)}, "
                 f"{where}) · surprise {self.surprise[j][p]:.2f} nats</p>"]
        if self.before is not None:
            parts.append(self._render_completions(j))
        for layer, rows in self.rows.items():
            parts.append(self._render_layer(layer, rows))
        parts.append("</div>")
        return "".join(parts)

    def _render_completions(self, j: int) -> str:
        text = self.texts[j]
        old, new = self.completions(j)
        mark = lambda c: "✓" if contains_answer(c, text.answers) else "✗"
        return (f"<p>“{html.escape(text.prompt)}” → before training: <b>{html.escape(repr(old))}</b> {mark(old)}, "
                f"after: <b>{html.escape(repr(new))}</b> {mark(new)} (answer {html.escape(text.answers[0])!r})</p>")

    def _render_layer(self, layer: int, rows: list[dict]) -> str:
        t, score = self.config.top_t, SCORE_NAMES[self.config.method]
        heads = ["slot", "weight", "p_bg", "p_b", f"{score} score", f"top-{t}"]
        heads += ["trained", "‖Δv‖"] if self.trained is not None else []
        heads += ["new-fact sentences reading it", "known-fact prompts reading it"]
        out = [f"<p style='margin:10px 0 2px'><b>layer {layer}</b></p><table style='border-collapse:collapse'><tr>"
               + "".join(f"<th style='{HEAD}'>{h}</th>" for h in heads[:-2])
               + "".join(f"<th style='{HEAD};text-align:left'>{h}</th>" for h in heads[-2:]) + "</tr>"]
        for r in rows:
            cells = [str(r["slot"]), f"{r['weight']:.3f}", f"{r['p_bg']:.2e}", f"{r['p_b']:.2e}", f"{r['score']:.4f}",
                     "✓" if r["selected"] else "–"]
            if self.trained is not None:
                cells += ["✓" if r["trained"] else "–", f"{r['moved']:.3g}"]
            mark = "background-color:rgba(47,174,143,0.18)" if r["selected"] else ""
            out.append(f"<tr data-slot='{r['slot']}' style='{mark}'>"
                       + "".join(f"<td style='{CELL}'>{c}</td>" for c in cells)
                       + f"<td style='{CELL};text-align:left'>{self._render_new(r['new'])}</td>"
                       + f"<td style='{CELL};text-align:left'>{self._render_known(r['known'], r)}</td></tr>")
        out.append("</table>")
        return "".join(out)

    def _render_new(self, readers: list[int]) -> str:
        if not readers:
            return "–"
        facts = list(dict.fromkeys(self.texts[t].source for t in readers))
        shown = ", ".join(facts[:4]) + (f" +{len(facts) - 4}" if len(facts) > 4 else "")
        return f"{len(readers)} sentences of {len(facts)} facts: {html.escape(shown)}" + self._examples(readers)

    def _render_known(self, readers: list[int], row: dict) -> str:
        if not readers:
            return "–"
        at_risk = row.get("trained", row["selected"])  # a row that is (or was) written changes what these read
        style = " style='color:#c0392b'" if at_risk else ""
        return f"<b{style}>{len(readers)} prompts</b>" + self._examples(readers)

    def _examples(self, readers: list[int]) -> str:
        items = "<br>".join(f"{html.escape(self.texts[t].source)}: “{html.escape(_label(self.texts[t].text, 50))}”"
                            for t in readers[: self.examples])
        return f"<br><span style='font-size:11px;opacity:0.75'>{items}</span>"

    def _on_sentence(self, change) -> None:
        if change["new"] is not None and change["new"] != self.text_index:
            self.show_text(change["new"])

    def _on_chip(self, position: int, _button: widgets.Button) -> None:
        self.show_token(position)

    def display(self) -> None:
        """Show the inspector (outside the last line of a cell)."""
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
