"""SlotInspector, driven headlessly: the table shows the chosen token and the slots a direct forward pass reads."""

import re

import pytest
import torch

from smf_lib.data import load_background, load_facts, load_known_facts
from smf_lib.models import load_base_model
from smf_lib.plots import token_labels
from smf_lib.retrofit import MemoryConfig, memory_layers, retrofit
from smf_lib.stats import collect_background, recording
from smf_lib.widgets import SlotInspector


@pytest.fixture(scope="module")
def inspector():
    model, tokenizer = load_base_model("tiny")
    retrofit(model, MemoryConfig(n_keys=16, topk=4))
    background = collect_background(model, tokenizer, load_background()[:6], progress=False)
    facts = load_facts(limit=3)
    known = load_known_facts()[:2]
    return SlotInspector(model, tokenizer, background, facts, known, top_t=20, progress=False)


def direct_reads(inspector, text: str, position: int) -> dict[int, list[int]]:
    """Per layer, the slots the token at `position` reads with weight >= min_weight, from a plain forward pass."""
    batch = inspector.tokenizer([text], return_tensors="pt")
    with torch.no_grad(), recording(inspector.model):
        inspector.model(**batch)
        reads = {}
        for m in memory_layers(inspector.model):
            idx, w = m.last_access.indices[0, position], m.last_access.weights[0, position] / m.heads
            total = torch.zeros(m.n_slots, dtype=torch.float64).index_add_(0, idx.reshape(-1), w.reshape(-1).double())
            reads[m.layer_index] = sorted(int(i) for i in torch.nonzero(total >= inspector.min_weight))
    return reads


def table_slots(html: str, layer: int) -> list[int]:
    """The slot indices listed in the HTML table of one layer."""
    section = html.split(f"<b>layer {layer}</b>")[1].split("</table>")[0]
    return [int(s) for s in re.findall(r"<tr[^>]*><td[^>]*>(\d+)</td>", section)]


def check_table(inspector, text: str, position: int) -> None:
    html = inspector.table.value
    token = token_labels(inspector.tokenizer, inspector.tokenizer(text)["input_ids"])[position]
    assert f"Token <b>{position}: " in html and token.replace("&", "&amp;") in html
    expected = direct_reads(inspector, text, position)
    assert sorted(expected) == [m.layer_index for m in inspector.layers]
    for layer, slots in expected.items():
        shown = table_slots(html, layer)
        assert shown, f"layer {layer} shows no slots"
        strongest = slots if len(slots) <= inspector.max_rows else None
        if strongest is not None:
            assert sorted(shown) == slots
        else:
            assert set(shown) <= set(slots) and len(shown) == inspector.max_rows
        assert [r["slot"] for r in inspector.rows[layer]] == shown


def test_starts_on_first_sentence_with_a_table(inspector):
    first = inspector.facts[0].train[0]
    assert inspector.sentence.value == first
    assert inspector.current.text == first
    assert len(inspector.token.options) == len(inspector.tokenizer(first)["input_ids"])
    check_table(inspector, first, inspector.token.value)


def test_choose_sentence_and_token(inspector):
    sentence = inspector.facts[1].train[2]
    inspector.sentence.value = sentence
    inspector.token.value = 3
    assert inspector.current.text == sentence
    check_table(inspector, sentence, 3)


def test_known_fact_is_offered(inspector):
    known = inspector.known[0]
    inspector.sentence.value = f"{known.prompt} {known.answer}"
    inspector.token.value = 0
    check_table(inspector, f"{known.prompt} {known.answer}", 0)


def test_typed_text(inspector):
    text = "Zebras & lions share the savannah."
    inspector.text.value = text
    assert inspector.current.text == text
    last = len(inspector.token.options) - 1
    inspector.token.value = last
    check_table(inspector, text, last)
    assert "Zebras &amp; lions" in inspector.table.value


def test_fact_readers_match_the_facts_sentences(inspector):
    fact = inspector.facts[0]
    for layer, slots_read in direct_reads(inspector, fact.probe,
                                          len(inspector.tokenizer(fact.probe)["input_ids"]) - 1).items():
        for slot in slots_read:
            assert fact.id in inspector.readers[layer][slot]


def test_selected_and_scores_are_consistent(inspector):
    inspector.sentence.value = inspector.facts[2].train[0]
    for layer, rows in inspector.rows.items():
        for r in rows:
            assert 0 < r["p_bg"] < 1 and 0 < r["weight"] <= 1 + 1e-9
            assert r["selected"] == bool(inspector.current.selected[layer][r["slot"]])
        assert int(inspector.current.selected[layer].sum()) <= inspector.top_t
    assert inspector._repr_mimebundle_() is not None
