"""SlotInspector, driven headlessly on the tiny profile: it selects the rows the real optimizer selects, its chips
show each token's slots as a plain forward pass reads them, its reader lists match direct reads, and its
before/after mode agrees with the trained model."""

import copy
import re
from html import escape

import pytest
import torch
from accelerate import Accelerator

from smf_lib.analysis import changed_rows, snapshot
from smf_lib.batches import build_examples, collate, counted_positions
from smf_lib.data import load_facts, load_known_facts
from smf_lib.evaluation import complete
from smf_lib.models import pad_id
from smf_lib.plots import token_labels
from smf_lib.reads import parameters_of
from smf_lib.retrofit import memory_layers
from smf_lib.selection import kl_scores
from smf_lib.stats import recording
from smf_lib.training import TrainConfig, make_optimizer, train, train_step
from smf_lib.widgets import SlotInspector

TOL = 1e-6  # reads this close to the threshold may fall either side of it, between a batch and a lone forward


@pytest.fixture(scope="module")
def facts():
    return load_facts(limit=3)


@pytest.fixture(scope="module")
def inspector(tiny_ready, facts):
    model, tokenizer, background = tiny_ready
    return SlotInspector(model, tokenizer, background, facts, TrainConfig(top_t=20), batch=facts[:2],
                         known=load_known_facts()[:6], progress=False)


@pytest.fixture(scope="module")
def trained(tiny_ready, facts):
    """(trained model, snapshot before training, config): three sparse steps on the first two facts."""
    model, tokenizer, background = tiny_ready
    model = copy.deepcopy(model)
    before = snapshot(model)
    config = TrainConfig(top_t=20, steps=3)
    model, _ = train(model, tokenizer, facts[:2], config, background, progress=False)
    return model, before, config


def slot_weights(model, tokenizer, text: str) -> dict[int, torch.Tensor]:
    """Per layer, (tokens, n_slots): each token's weight on each slot (summed over heads / heads), a lone forward."""
    batch = tokenizer([text], return_tensors="pt")
    out = {}
    with torch.no_grad(), recording(model):
        model(**batch)
        for m in memory_layers(model):
            idx, w = m.last_access.indices[0], m.last_access.weights[0].double() / m.heads
            rows = torch.arange(len(idx))[:, None, None].expand_as(idx)
            out[m.layer_index] = torch.zeros(len(idx), m.n_slots, dtype=torch.float64).index_put_(
                (rows.reshape(-1), idx.reshape(-1)), w.reshape(-1), accumulate=True)
    return out


def table_slots(html: str, layer: int) -> list[int]:
    """The slot indices listed in the HTML table of one layer, in order."""
    section = html.split(f"<b>layer {layer}</b>")[1].split("</table>")[0]
    return [int(s) for s in re.findall(r"<tr data-slot='(\d+)'[^>]*><td[^>]*>(?:\1)</td>", section)]


def table_row(html: str, layer: int, slot: int) -> str:
    section = html.split(f"<b>layer {layer}</b>")[1].split("</table>")[0]
    return section.split(f"<tr data-slot='{slot}'")[1].split("</tr>")[0]


# --- the batch is scored as the trainer scores it ---------------------------------------------------------------


def optimizer_rows(model, tokenizer, background, facts, config) -> list[torch.Tensor]:
    """The rows a real `train_step` with the real `SparseMemoryOptimizer` selects for the batch of `facts`."""
    model, optimizer, _ = make_optimizer(copy.deepcopy(model), config, background)
    batch = collate(build_examples(facts, tokenizer, config.max_length), pad_id(tokenizer), torch.device("cpu"))
    try:
        train_step(model, optimizer, batch, config, Accelerator(cpu=True))
    finally:
        optimizer.detach()
    return [r.cpu() for r in optimizer.last_rows]


@pytest.mark.parametrize("method, count_on", [("smf_kl", "answer"), ("smf_kl", "entities"), ("smf_kl", "all"),
                                              ("smf_tfidf", "answer")])
def test_selected_rows_are_the_optimizers(tiny_ready, facts, method, count_on):
    model, tokenizer, background = tiny_ready
    config = TrainConfig(method=method, top_t=20, count_on=count_on)
    inspector = SlotInspector(model, tokenizer, background, facts, config, batch=facts[:2], progress=False)
    expected = optimizer_rows(model, tokenizer, background, facts[:2], config)
    for m, rows in zip(memory_layers(model), expected):
        assert torch.equal(inspector.scores.selected[m.layer_index], rows), f"layer {m.layer_index}"
        assert set(torch.nonzero(inspector.selected[m.layer_index]).flatten().tolist()) == set(rows.tolist())
    assert any(len(r) == config.top_t for r in expected)  # the budget binds: the order of scores matters


def test_counting_follows_the_config(tiny_ready, facts):
    model, tokenizer, background = tiny_ready
    chosen = {}
    for count_on in ("answer", "all"):
        config = TrainConfig(top_t=20, count_on=count_on)
        chosen[count_on] = SlotInspector(model, tokenizer, background, facts, config, batch=facts[:2],
                                         progress=False).scores.selected
    assert any(not torch.equal(chosen["answer"][i], chosen["all"][i]) for i in chosen["all"])


def test_chips_are_the_tokens_underlined_where_counted(inspector, facts):
    tokenizer = inspector.tokenizer
    batch = collate(build_examples(facts[:2], tokenizer), pad_id(tokenizer), torch.device("cpu"))
    counted = counted_positions(batch, inspector.config.count_on)
    for j, sentence in enumerate(s for f in facts[:2] for s in f.train):
        inspector.sentence.value = j
        ids = tokenizer(sentence)["input_ids"]
        assert [c.description for c in inspector.chip_buttons] == token_labels(tokenizer, ids)
        underlined = [c.style.text_decoration == "underline" for c in inspector.chip_buttons]
        assert underlined == counted[j, : len(ids)].tolist()
        assert any(underlined)
    surprise = inspector.surprise[0]
    inspector.sentence.value = 0
    hot = max(range(len(surprise)), key=surprise.__getitem__)
    cold = min(range(len(surprise)), key=surprise.__getitem__)
    assert surprise[hot] > 0 > surprise[cold]
    red = lambda c: int(c.style.button_color[1:3], 16)
    blue = lambda c: int(c.style.button_color[5:7], 16)
    assert red(inspector.chip_buttons[hot]) > blue(inspector.chip_buttons[hot])
    assert blue(inspector.chip_buttons[cold]) > red(inspector.chip_buttons[cold])


def test_clicking_a_chip_shows_that_tokens_slots(inspector, facts):
    text = facts[1].train[1]
    j = [t.text for t in inspector.texts].index(text)
    inspector.sentence.value = j
    for position in (0, 3, len(inspector.chip_buttons) - 1):
        inspector.chip_buttons[position].click()
        assert inspector.position == position
        assert [c.layout.border.startswith("2px solid #222") for c in inspector.chip_buttons] == [
            p == position for p in range(len(inspector.chip_buttons))]
        html = inspector.table.value
        label = token_labels(inspector.tokenizer, inspector.tokenizer(text)["input_ids"])[position]
        assert f"Token <b>{position}: " in html and label in html and text in html
        weights = slot_weights(inspector.model, inspector.tokenizer, text)
        for layer, w in weights.items():
            shown = table_slots(html, layer)
            assert shown == [r["slot"] for r in inspector.rows[layer]] and shown
            read = w[position]
            assert all(read[s] >= inspector.min_weight - TOL for s in shown)
            strong = {int(s) for s in torch.nonzero(read >= inspector.min_weight + TOL)}
            assert strong <= set(shown) or len(shown) == inspector.max_rows
            assert [r["weight"] for r in inspector.rows[layer]] == pytest.approx([float(read[s]) for s in shown],
                                                                                 abs=TOL)


def test_table_scores_and_marks_are_the_batchs(inspector):
    inspector.sentence.value = 0
    counted = [p for p, c in enumerate(inspector.counted(0)) if c]
    assert inspector.position in counted  # starts at a counted token
    for p in counted:
        inspector.chip_buttons[p].click()
        for layer, rows in inspector.rows.items():
            kl = kl_scores(inspector.scores.counts[layer], inspector.background.counts[layer])
            for r in rows:
                assert r["score"] == pytest.approx(float(kl[r["slot"]]), rel=1e-9, abs=1e-15)
                assert r["selected"] == (r["slot"] in inspector.scores.selected[layer].tolist())
                cells = re.findall(r"<td[^>]*>([^<]*)</td>", table_row(inspector.table.value, layer, r["slot"]))
                assert cells[5] == ("✓" if r["selected"] else "–")
    assert any(r["selected"] for p in counted for rows in inspector.slots(0, p).values() for r in rows)


def test_readers_are_the_sentences_that_read_the_slot(inspector, facts):
    model, tokenizer = inspector.model, inspector.tokenizer
    lone = {j: slot_weights(model, tokenizer, t.text) for j, t in enumerate(inspector.texts)}
    inspector.sentence.value = 1
    inspector.chip_buttons[2].click()
    checked = 0
    for layer, rows in inspector.rows.items():
        for r in rows:
            strongest = {j: float(w[layer][:, r["slot"]].max()) for j, w in lone.items()}
            listed = set(r["new"]) | set(r["known"])
            for j, weight in strongest.items():
                if abs(weight - inspector.min_weight) > TOL:
                    assert (j in listed) == (weight >= inspector.min_weight), (layer, r["slot"], j)
                    checked += 1
            assert all(not inspector.texts[j].known for j in r["new"]) and all(
                inspector.texts[j].known for j in r["known"])
            row = table_row(inspector.table.value, layer, r["slot"])
            if r["known"]:
                assert f"{len(r['known'])} prompts</b>" in row
            if r["new"]:
                n_facts = len({inspector.texts[j].source for j in r["new"]})
                assert f"{len(r['new'])} sentences of {n_facts} facts" in row
    assert checked and any(j >= inspector.n_batch and not inspector.texts[j].known  # a fact outside the batch
                           for rows in inspector.rows.values() for r in rows for j in r["new"])


def test_a_known_prompt_is_shown_outside_the_batch(inspector):
    j = next(j for j, t in enumerate(inspector.texts) if t.known)
    inspector.sentence.value = j
    prompt = inspector.texts[j].text
    assert len(inspector.chip_buttons) == len(inspector.tokenizer(prompt)["input_ids"])
    assert not any(c.style.text_decoration == "underline" for c in inspector.chip_buttons)
    inspector.chip_buttons[0].click()
    assert "a known fact's prompt, not in the batch" in inspector.table.value
    assert prompt in inspector.table.value


def test_inspectors_keep_their_own_state(tiny_ready, facts, inspector):
    model, tokenizer, background = tiny_ready
    other = SlotInspector(model, tokenizer, background, facts, TrainConfig(top_t=20), batch=facts[:1],
                          progress=False)
    inspector.sentence.value = 0
    inspector.chip_buttons[1].click()
    shown = inspector.table.value
    other.chip_buttons[0].click()
    assert inspector.position == 1 and inspector.table.value == shown
    assert other.position == 0 and other.table.value != shown
    assert other._repr_mimebundle_() is not None


# --- before and after training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("as_model", [False, True])
def test_before_after_shows_trained_rows_and_completions(tiny_ready, facts, trained, as_model):
    untrained, tokenizer, background = tiny_ready
    model, before, config = trained
    own = snapshot(model)
    inspector = SlotInspector(model, tokenizer, background, facts, config, batch=facts[:2],
                              before=untrained if as_model else before, progress=False)
    changed, names = changed_rows(before, model), {id(p): n for n, p in model.named_parameters()}
    assert any(len(r) for r in changed.values())
    for m in memory_layers(model):
        i = m.layer_index
        assert set(torch.nonzero(inspector.trained[i]).flatten().tolist()) == set(changed[i].tolist())
        moved = (m.values.weight - before[names[id(m.values.weight)]]).norm(dim=1)
        assert torch.allclose(inspector.moved[i], moved)
        assert torch.equal(inspector.moved[i] > 0, inspector.trained[i])
    trained_shown = 0
    for j in range(inspector.n_batch):
        inspector.sentence.value = j
        for layer, rows in inspector.rows.items():
            for r in rows:
                cells = re.findall(r"<td[^>]*>([^<]*)</td>", table_row(inspector.table.value, layer, r["slot"]))
                assert cells[6] == ("✓" if r["trained"] else "–")
                assert float(cells[7]) == pytest.approx(r["moved"], rel=1e-2, abs=1e-12)
                trained_shown += r["trained"]
        prompt = inspector.texts[j].prompt
        old, new = inspector.completions(j)
        assert old == complete(untrained, tokenizer, [prompt])[0] and new == complete(model, tokenizer, [prompt])[0]
        assert f"before training: <b>{escape(repr(old))}</b>" in inspector.table.value
        assert f"after: <b>{escape(repr(new))}</b>" in inspector.table.value
    assert trained_shown  # some slot the batch reads was trained
    assert all(torch.equal(p, own[n]) for n, p in model.named_parameters())  # the model is left as it was


def test_parameters_of_swaps_in_the_untrained_values_and_back(tiny_ready, trained):
    model, before, _ = trained
    own = snapshot(model)
    with parameters_of(model, before):
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, own[n]) for n, p in model.named_parameters())
    assert any(not torch.equal(own[n], before[n]) for n in own)


# --- bad input --------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_message(tiny_base, tiny_ready, facts):
    model, tokenizer, background = tiny_ready
    with pytest.raises(ValueError, match="retrofit"):
        SlotInspector(tiny_base[0], tokenizer, background, facts, progress=False)
    with pytest.raises(ValueError, match="selection of smf_kl or smf_tfidf"):
        SlotInspector(model, tokenizer, background, facts, TrainConfig(method="full_ft"), progress=False)
    with pytest.raises(ValueError, match="no training sentences"):
        SlotInspector(model, tokenizer, background, facts, batch=[], progress=False)
    with pytest.raises(ValueError, match="snapshot"):
        SlotInspector(model, tokenizer, background, facts, before={}, progress=False)
    with pytest.raises(RuntimeError, match="before"):
        SlotInspector(model, tokenizer, background, facts, progress=False).completions(0)
