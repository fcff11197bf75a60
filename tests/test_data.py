"""The bundled data sets load, meet their stated sizes, and malformed files fail clearly."""

import json
import subprocess
import sys

import pytest

from smf_lib.data import (DATA_DIR, DataFormatError, Fact, KnownFact, load_background,
                          load_facts, load_heldout_text, load_known_facts)


def question(prompt: str) -> str:
    """The question of a "Question: ...\\nAnswer:" prompt."""
    return prompt.removeprefix("Question: ").split("\nAnswer:")[0]


def test_bundled_facts_meet_stated_sizes():
    facts = load_facts()
    assert len(facts) >= 200
    for fact in facts:
        assert len(fact.train) >= 5 and len(fact.heldout) >= 2
        assert all(fact.answer in sentence for sentence in fact.train)
        assert sum(s.startswith("Question: ") for s in fact.train) >= 2
        assert any(s.startswith(fact.probe + " " + fact.answer) for s in fact.train)
        for prompt in fact.heldout:
            assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
            assert not any(question(prompt) in s for s in fact.train), (fact.id, prompt)
            assert fact.answer not in prompt


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
