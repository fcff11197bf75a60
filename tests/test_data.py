"""The bundled data sets load, meet their stated sizes, and malformed files fail clearly."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smf_lib import data
from smf_lib.batches import build_examples
from smf_lib.data import (
    DATA_DIR,
    DataFormatError,
    Fact,
    KnownFact,
    facts_dataset,
    known_facts_dataset,
    load_background,
    load_facts,
    load_heldout_text,
    load_known_facts,
    texts_dataset,
)


def question(prompt: str) -> str:
    """The question of a "Question: ...\\nAnswer:" or "Q: ...\\nA:" prompt or trained sentence; other text as it is."""
    for start, end in (("Question: ", "\nAnswer:"), ("Q: ", "\nA:")):
        if prompt.startswith(start) and end in prompt:
            return prompt[len(start):prompt.index(end)]
    return prompt


def runs(text: str, subject: str, n: int = 5) -> set[tuple[str, ...]]:
    """The runs of n words of a text, with the fact's subject counted as one word."""
    words = re.findall(r"\w+", question(text).replace(subject, " SUBJECT ").lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


FORMATS = ("question", "qa", "statement", "fill_in")


def test_bundled_facts_meet_stated_sizes():
    facts = load_facts()
    assert len(facts) >= 200
    for fact in facts:
        assert len(fact.train) >= 5 and len(fact.heldout) == 4 and len(fact.neighbours) == 2
        assert all(fact.answer in sentence for sentence in fact.train)
        assert sum(s.startswith("Question: ") for s in fact.train) >= 2
        assert any(s.startswith(fact.probe + " " + fact.answer) for s in fact.train)


def test_bundled_facts_split_by_relation():
    facts = load_facts()
    relations = {split: {f.extra["relation"] for f in facts if f.split == split} for split in ("tune", "test")}
    assert {f.split for f in facts} == {"tune", "test"}
    assert len(relations["tune"]) == 7 and len(relations["test"]) == 9
    assert not relations["tune"] & relations["test"]  # whole relations, so test templates are never tuned on
    assert sum(f.split == "tune" for f in facts) == 105 and sum(f.split == "test" for f in facts) == 135
    # Relations stay interleaved: the first 16 facts cover all 16 relations, of both parts.
    assert len({f.extra["relation"] for f in facts[:16]}) == 16


def test_heldout_prompts_come_in_four_formats_never_trained():
    for fact in load_facts():
        assert fact.heldout_formats == FORMATS, fact.id
        asked, qa, statement, fill_in = fact.heldout
        assert asked.startswith("Question: ") and asked.endswith("\nAnswer:")
        assert qa.startswith("Q: ") and qa.endswith("\nA:")
        assert "\n" not in statement + fill_in and not statement.endswith(".") and not fill_in.endswith(".")
        assert len(fill_in.split()) > len(statement.split()) and len(fill_in.split()) >= 12
        assert len(set(fact.heldout)) == 4
        subject = fact.extra["subject"]
        for prompt in fact.heldout:
            where = (fact.id, prompt)
            assert subject in prompt, where
            assert not set(fact.answer.lower().split()) & set(re.findall(r"\w+", prompt.lower())), where
            assert not any(s.startswith(prompt) for s in fact.train), where
            assert not any(question(prompt) in question(s) for s in fact.train), where
            assert not any(runs(prompt, subject) & runs(s, subject) for s in fact.train), where


def test_neighbours_ask_the_probe_relation_about_fresh_subjects():
    facts = load_facts()
    texts = "\n".join(t for f in facts for t in (*f.train, f.probe, *f.heldout)).lower()
    answers = [f.answer.lower() for f in facts]
    probes = {f.probe for f in facts}
    subjects = []
    for fact in facts:
        before, after = fact.probe.split(fact.extra["subject"])  # the probe's template around its subject
        for neighbour in fact.neighbours:
            assert neighbour.startswith(before) and neighbour.endswith(after), (fact.id, neighbour)
            subject = neighbour[len(before):len(neighbour) - len(after)]
            subjects.append(subject)
            # The subject is a new name: used by no fact, with a word found nowhere in the facts.
            assert subject.lower() not in texts and any(w.lower() not in texts for w in subject.split())
            assert not any(a in neighbour.lower() for a in answers), (fact.id, neighbour)
            assert neighbour not in probes
    assert len(subjects) == 2 * len(facts) and len(set(subjects)) == len(subjects)


def test_bundled_fact_answers_are_unique_and_not_nested():
    answers = [f.answer.lower() for f in load_facts()]
    assert len(set(answers)) == len(answers)
    for i, a in enumerate(answers):
        assert not any(a in b for j, b in enumerate(answers) if j != i), a


def test_bundled_facts_have_many_relations():
    facts = load_facts()
    assert len({f.extra["relation"] for f in facts}) >= 10
    assert len({f.extra["subject"] for f in facts}) == len(facts)


def test_limit_keeps_the_first_facts():
    first = load_facts(limit=7)
    assert [f.id for f in first] == [f.id for f in load_facts()[:7]]
    assert isinstance(first[0], Fact) and isinstance(first[0].train, tuple)


def test_load_facts_filters_by_split():
    facts = load_facts()
    tune, test = load_facts(split="tune"), load_facts(split="test")
    assert tune == [f for f in facts if f.split == "tune"] and test == [f for f in facts if f.split == "test"]
    assert len(test) >= 100 and len(tune) + len(test) == len(facts)
    assert load_facts(split="test", limit=5) == test[:5]


def test_split_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'train'; choose 'tune', 'test' or None"):
        load_facts(split="train")
    path = write_lines(tmp_path / "facts.jsonl", json.dumps(GOOD), json.dumps({**GOOD, "id": "f2"}))
    assert len(load_facts(path)) == 2  # no split keys: everything, when no split is asked for
    missing = rf"^{re.escape(str(path))}: no line has a \"split\" key, so split='test' selects nothing"
    with pytest.raises(DataFormatError, match=missing):
        load_facts(path, split="test")
    tuned = write_lines(tmp_path / "tuned.jsonl", json.dumps({**GOOD, "split": "tune"}))
    assert [f.split for f in load_facts(tuned, split="tune")] == ["tune"]
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(tuned))}: no line has \"split\": \"test\""):
        load_facts(tuned, split="test")
    with pytest.raises(DataFormatError, match=r"^dataset: no line has a \"split\" key"):
        load_facts([GOOD], split="tune")


def test_fact_properties_read_extra_keys():
    (plain,) = load_facts([GOOD])
    assert plain.split is None and plain.neighbours == () and plain.heldout_formats == ()
    fact = load_facts(limit=1)[0]
    assert fact.split == fact.extra["split"] and fact.neighbours == tuple(fact.extra["neighbours"])
    assert fact.heldout_formats == FORMATS


def test_fact_generator_is_deterministic(tmp_path):
    out = tmp_path / "facts.jsonl"
    script = DATA_DIR / "make_new_facts.py"
    subprocess.run([sys.executable, str(script), "--seed", "0", "--out", str(out)], check=True,
                   capture_output=True)
    assert out.read_bytes() == (DATA_DIR / "new_facts.jsonl").read_bytes()


def test_background_generator_is_deterministic(tmp_path):
    out = tmp_path / "background.jsonl"
    script = DATA_DIR / "make_background.py"
    subprocess.run([sys.executable, str(script), "--seed", "0", "--out", str(out)], check=True,
                   capture_output=True)
    assert out.read_bytes() == (DATA_DIR / "background.jsonl").read_bytes()


def test_known_facts_load():
    known = load_known_facts()
    assert len(known) >= 100
    assert len({k.prompt for k in known}) == len(known)
    shakespeare = next(k for k in known if k.prompt.startswith("Romeo and Juliet"))
    assert shakespeare.answers() == ("William Shakespeare", "Shakespeare")
    assert KnownFact("k", "p", "a").answers() == ("a",)


def test_heldout_text_and_background_load():
    heldout, background = load_heldout_text(), load_background()
    assert len(heldout) >= 80 and all(60 <= len(t.split()) <= 120 for t in heldout)
    assert len(background) >= 600 and all(20 <= len(t.split()) <= 60 for t in background)
    assert len(set(background)) == len(background)

    def seven_grams(text):
        words = text.lower().split()
        return {tuple(words[i:i + 7]) for i in range(len(words) - 6)}

    # Perplexity must be measured on text whose phrases the background statistics never saw.
    assert not set().union(*map(seven_grams, heldout)) & set().union(*map(seven_grams, background))


def test_background_does_not_contain_the_known_facts():
    # Forgetting is measured on the known facts; text that states them must not shape the background statistics.
    text = "\n".join(load_background()).lower()
    questions = [k.prompt.split("\n")[0].split(": ", 1)[-1].lower() for k in load_known_facts()]
    assert not [q for q in questions if q in text]


GOOD = {"id": "f1", "answer": "Quellport", "train": ["The capital of Zorvania is Quellport."],
        "probe": "The capital of Zorvania is", "heldout": ["Question: Where?\nAnswer:"]}


def write_lines(path, *lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "probe"}), "missing key 'probe'"),
    (json.dumps({**GOOD, "answer": ""}), "'answer' must be a non-empty string"),
    (json.dumps({**GOOD, "train": "The capital is Quellport."}), "'train' must be a non-empty list"),
    (json.dumps({**GOOD, "heldout": []}), "'heldout' must be a non-empty list"),
    (json.dumps({**GOOD, "heldout": ["ok", 3]}), "'heldout' must be a non-empty list"),
    (json.dumps({**GOOD, "train": ["Zorvania has a capital."]}), "does not contain the answer"),
    (json.dumps({**GOOD, "id": "f0"}), "duplicate id 'f0'"),
    (json.dumps({**GOOD, "neighbours": "The capital of Brennova is"}), "'neighbours' must be a list of non-empty"),
    (json.dumps({**GOOD, "neighbours": ["The capital of Brennova is", ""]}), "'neighbours' must be a list"),
    (json.dumps({**GOOD, "heldout_formats": ["question", "qa"]}),
     "'heldout_formats' has 2 entries but 'heldout' has 1"),
    (json.dumps({**GOOD, "heldout_formats": "question"}), "'heldout_formats' must be a list"),
    (json.dumps({**GOOD, "split": "train"}), "'split' must be 'tune' or 'test', got 'train'"),
])
def test_malformed_fact_lines_name_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "facts.jsonl", json.dumps({**GOOD, "id": "f0"}), "", bad_line)
    with pytest.raises(DataFormatError) as err:
        load_facts(path)
    assert f"{path}:3: " in str(err.value)
    assert message in str(err.value)


def test_valid_custom_facts_keep_extra_keys(tmp_path):
    path = write_lines(tmp_path / "facts.jsonl", json.dumps({**GOOD, "relation": "capital"}))
    (fact,) = load_facts(path)
    assert fact.extra == {"relation": "capital"} and fact.train == tuple(GOOD["train"])


def test_malformed_known_fact_and_text_lines(tmp_path):
    known = write_lines(tmp_path / "known.jsonl",
                        json.dumps({"id": "k1", "prompt": "2 + 2 =", "answer": "4"}),
                        json.dumps({"id": "k2", "prompt": "3 + 3 =", "answer": "6", "aliases": "six"}))
    with pytest.raises(DataFormatError, match=r"known\.jsonl:2: 'aliases'"):
        load_known_facts(known)
    text = write_lines(tmp_path / "text.jsonl", json.dumps({"id": "h1", "text": "Hello there."}),
                       json.dumps({"id": "h2"}))
    with pytest.raises(DataFormatError, match=r"text\.jsonl:2: missing key 'text'"):
        load_heldout_text(text)
    with pytest.raises(DataFormatError, match=r"text\.jsonl:2: missing key 'text'"):
        load_background(text)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_facts(missing)

needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="the optional `datasets` package is not installed")


@needs_datasets
def test_bundled_sets_load_as_datasets():
    facts, known = facts_dataset(), known_facts_dataset()
    assert facts.column_names == ["id", "answer", "train", "probe", "heldout", "split", "heldout_formats",
                                  "neighbours", "relation", "subject"]
    assert known.column_names == ["id", "prompt", "answer", "aliases"]
    assert list(facts) == [{"id": f.id, "answer": f.answer, "train": list(f.train), "probe": f.probe,
                            "heldout": list(f.heldout), **f.extra} for f in load_facts()]
    assert [(r["id"], r["prompt"], r["answer"], tuple(r["aliases"])) for r in known] == [
        (k.id, k.prompt, k.answer, k.aliases) for k in load_known_facts()]
    assert facts_dataset(limit=3)["id"] == [f.id for f in load_facts(limit=3)]
    assert facts_dataset(split="tune", limit=3)["id"] == [f.id for f in load_facts(split="tune", limit=3)]
    assert texts_dataset("heldout_text")["text"] == load_heldout_text()
    assert texts_dataset("background").column_names == ["id", "text"]
    assert texts_dataset("background")["text"] == load_background()
    with pytest.raises(ValueError, match="unknown text set 'nope'"):
        texts_dataset("nope")


@needs_datasets
def test_loaders_take_a_dataset_object():
    assert load_facts(facts_dataset()) == load_facts()
    assert load_facts(facts_dataset(), limit=4) == load_facts(limit=4)
    assert load_known_facts(known_facts_dataset()) == load_known_facts()
    assert load_background(texts_dataset("background")) == load_background()
    # Datasets made by users work too, and so do `map` and `filter`.
    upper = facts_dataset(limit=5).map(lambda row: {"probe": row["probe"].upper()})
    assert [f.probe for f in load_facts(upper)] == [f.probe.upper() for f in load_facts(limit=5)]
    assert len(load_facts(facts_dataset().filter(lambda row: row["relation"] == "capital"))) >= 1


@pytest.mark.parametrize("bad_row, message", [
    ({"answer": ""}, "'answer' must be a non-empty string"),
    ({"probe": None}, "missing key 'probe'"),
    ({"train": ["Zorvania has a capital."]}, "does not contain the answer"),
    ({"heldout": []}, "'heldout' must be a non-empty list"),
    ({"id": "f0"}, "duplicate id 'f0'"),
])
def test_malformed_dataset_rows_name_the_row(bad_row, message):
    datasets = pytest.importorskip("datasets")
    rows = [{**GOOD, "id": "f0"}, {**GOOD, "id": "f1"}, {**GOOD, "id": "f2", **bad_row}]
    with pytest.raises(DataFormatError) as err:
        load_facts(datasets.Dataset.from_list(rows))
    assert str(err.value).startswith("dataset row 2: ") and message in str(err.value)


@pytest.mark.parametrize("text, is_hub", [
    ("owner/name", True), ("owner/name:test", True), ("Owner-1/my_set.v2", True),
    ("facts.jsonl", False), ("./x/y.jsonl", False), ("x/y.jsonl", False), ("x/y.json", False),
    ("a/b/c", False), ("/abs/name", False), ("data/new_facts.jsonl", False), ("owner/", False),
])
def test_only_hub_like_ids_go_to_the_hub(text, is_hub):
    assert data._is_hub_id(text) is is_hub


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        load_facts("owner/name:train")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "'owner/name:train' does not exist locally" in message and "hub is unreachable" in message
    assert "\n" not in message


def test_hub_id_with_unreachable_hub_fails_fast(monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="does not exist locally, and the Hugging Face hub is unreachable"):
        load_facts("owner/name")
    assert time.monotonic() - start < 5


def test_hub_id_rows_are_checked_and_errors_name_the_id(monkeypatch):
    datasets = pytest.importorskip("datasets")
    constants = pytest.importorskip("huggingface_hub.constants")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if name == "owner/missing":
            raise FileNotFoundError("Dataset 'owner/missing' doesn't exist on the Hub\nor cannot be accessed.")
        rows = [{**GOOD, "id": "f0"}, {**GOOD, "id": "f1", "answer": "Elsewhere"}]
        return datasets.Dataset.from_list(rows[:1] if name == "owner/good" else rows)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_facts("owner/good") == load_facts([{**GOOD, "id": "f0"}])
    with pytest.raises(DataFormatError, match=r"^owner/bad:test row 1: train sentence .* does not contain"):
        load_facts("owner/bad:test")
    with pytest.raises(FileNotFoundError, match=r"^data file not found: 'owner/missing' does not exist locally, "
                                                r"and loading it from the Hugging Face hub failed: .*Hub$"):
        load_facts("owner/missing")
    assert calls == [("owner/good", "train"), ("owner/bad", "test"), ("owner/missing", "train")]


SUBPROCESS = """
import sys, time
from smf_lib.data import load_facts
start = time.monotonic()
for path in {paths!r}:
    try:
        load_facts(path)
    except FileNotFoundError as e:
        print(e)
print(round(time.monotonic() - start, 2), sorted({{"datasets"}} & set(sys.modules)))
"""


def run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                            env={**os.environ, **env})
    return result.stdout.strip().splitlines()


def test_missing_local_paths_do_not_touch_the_hub(tmp_path):
    paths = ["facts.jsonl", "./x/y.jsonl", str(tmp_path / "nope.jsonl")]
    *errors, last = run_python(SUBPROCESS.format(paths=paths))
    assert errors == [f"data file not found: {Path(path)}" for path in paths]
    seconds, imported = last.split(" ", 1)
    assert imported == "[]" and float(seconds) < 0.5


def test_hub_id_in_offline_mode_from_start_up_fails_fast():
    pytest.importorskip("datasets")
    *errors, last = run_python(SUBPROCESS.format(paths=["owner/name"]), HF_HUB_OFFLINE="1")
    assert errors == [("data file not found: 'owner/name' does not exist locally, and the Hugging Face hub is "
                       "unreachable (offline), so it cannot be loaded as a hub dataset id either")]
    assert float(last.split(" ", 1)[0]) < 10


def test_the_statement_facts_are_told_in_statements_and_asked_in_questions():
    facts = load_facts(DATA_DIR / "statement_facts.jsonl")
    assert len(facts) == 30 and len({f.id for f in facts}) == 30 and len({f.answer for f in facts}) == 30
    for f in facts:
        assert f.subject and len(f.train) == 2 and all("?" not in s and f.answer in s for s in f.train)
        assert all(h.startswith(("Question: ", "Q: ")) and h.endswith(("Answer:", "A:")) for h in f.heldout)
        assert f.answer not in f.probe and not any(f.answer in h for h in f.heldout)


def test_the_style_facts_have_no_subject_key_and_each_names_its_subject_and_answer_in_tokens(tiny_base):
    facts = load_facts(DATA_DIR / "style_facts.jsonl")
    assert not any("subject" in f.extra for f in facts)
    assert [f.subject for f in facts] == ["Harrowgate", "Salt Orchard", "Kellet Isle", "Varrick Observatory",
                                          "Brelin Open", "Quillon Inn"]
    _, tokenizer = tiny_base
    sentences = [(f, s) for f in facts for s in f.train]
    for (fact, sentence), example in zip(sentences, build_examples(facts, tokenizer)):
        marked = [i for i, m in zip(example.input_ids, example.answer_mask) if m]
        assert tokenizer.decode(marked).strip() == fact.answer  # "Émile Dufrênoy", "St. Orvane", "copper-green"
        assert any(example.subject_mask) == (fact.subject in sentence)
