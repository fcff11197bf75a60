"""The known facts carry a fixed tune/test split that mixes prompt shapes and topics, and the base model knows enough
of each half.

The lines are read with the json module, so these checks do not depend on how `smf_lib.data` loads the file.
"""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

KNOWN_FACTS = Path(__file__).resolve().parents[1] / "data" / "known_facts.jsonl"
SPLITS = ("tune", "test")


def records() -> list[dict]:
    lines = KNOWN_FACTS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def shape(prompt: str) -> str:
    """The prompt's form: a "Question: ...\\nAnswer:" or "Q: ...\\nA:" question, a sum, a list to continue, or a
    statement cut before its answer."""
    if prompt.startswith("Question: ") and prompt.endswith("\nAnswer:"):
        return "question"
    if prompt.startswith("Q: ") and prompt.endswith("\nA:"):
        return "q-a"
    if prompt.endswith("="):
        return "sum"
    if prompt.endswith(","):
        return "list"
    return "statement"


def test_every_fact_is_in_one_split():
    bad = [(r.get("id"), r.get("split")) for r in records() if r.get("split") not in SPLITS]
    assert not bad


def test_ids_and_prompts_are_unique():
    rows = records()
    ids = Counter(r["id"] for r in rows)
    prompts = Counter(r["prompt"] for r in rows)
    assert all(re.fullmatch(r"k\d{3,}", i) for i in ids)
    assert [i for i, n in ids.items() if n > 1] == []
    assert [p for p, n in prompts.items() if n > 1] == []


def test_the_splits_are_halves_that_mix_prompt_shapes():
    rows = records()
    sizes = Counter(r["split"] for r in rows)
    assert min(sizes[s] for s in SPLITS) >= 0.45 * len(rows), sizes
    shapes = {s: Counter(shape(r["prompt"]) for r in rows if r["split"] == s) for s in SPLITS}
    assert all(len(shapes[s]) >= 4 for s in SPLITS), shapes
    # Every shape that occurs at least twice occurs in both halves.
    every = Counter(shape(r["prompt"]) for r in rows)
    assert all(shapes[s][k] for s in SPLITS for k, n in every.items() if n >= 2), shapes


def test_the_splits_mix_topics():
    # Facts asked the same way about different things (capitals, authors, currencies, ...) go to both halves.
    rows = records()
    frames = Counter()
    for r in rows:
        words = re.findall(r"\w+", r["prompt"].split("\n")[0].removeprefix("Question: ").removeprefix("Q: ").lower())
        frames[(shape(r["prompt"]), " ".join(words[:3]), r["split"])] += 1
    big = {(sh, w) for (sh, w, _), n in frames.items() if sum(frames[(sh, w, s)] for s in SPLITS) >= 6}
    assert len(big) >= 10
    for frame in big:
        counts = [frames[(*frame, s)] for s in SPLITS]
        assert min(counts) >= 0.3 * sum(counts), (frame, counts)


@pytest.mark.slow
def test_the_base_model_answers_enough_facts_in_each_split():
    from smf_lib.data import KnownFact
    from smf_lib.evaluation import known_correct
    from smf_lib.models import load_base_model

    rows = records()
    known = [KnownFact(r["id"], r["prompt"], r["answer"], tuple(r.get("aliases", ()))) for r in rows]
    model, tokenizer = load_base_model("smollm2-135m")
    answered = Counter(r["split"] for r, ok in zip(rows, known_correct(model, tokenizer, known)) if ok)
    assert answered["test"] >= 150 and answered["tune"] >= 100, dict(answered)


def test_answer_loss_is_lower_for_true_answers_and_independent_of_the_batch():
    from smf_lib.data import load_known_facts
    from smf_lib.evaluation import answer_nll
    from smf_lib.models import load_base_model

    model, tokenizer = load_base_model("smollm2-135m")
    known = load_known_facts()[:40]
    prompts, answers = [k.prompt for k in known], [k.answer for k in known]
    true = answer_nll(model, tokenizer, prompts, answers, batch_size=16)
    swapped = answer_nll(model, tokenizer, prompts, answers[1:] + answers[:1], batch_size=16)
    assert true.shape == (40,) and float((true < swapped).float().mean()) >= 0.8
    alone = answer_nll(model, tokenizer, prompts[5:6], answers[5:6])
    assert alone.item() == pytest.approx(true[5].item(), abs=1e-3)
