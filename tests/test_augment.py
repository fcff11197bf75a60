"""Model-written wordings (`augment`), subject positions and the trained-read share."""

import copy
import dataclasses
import random
import re

import pytest
import torch

from smf_lib.analysis import trained_read_share
from smf_lib.augment import BLANK, _keep, augment, invented_word, told_of_a_stranger
from smf_lib.batches import build_examples, collate, counted_positions
from smf_lib.data import Fact, load_facts
from smf_lib.training import TrainConfig, train

FACT = Fact("x1", "Quellport", ("The capital of Zorvania is Quellport.",), "The capital of Zorvania is",
            ("Question: Which city is the capital of Zorvania?\nAnswer:",), {"subject": "Zorvania"})


@pytest.mark.parametrize("question, kept", [
    ("What is the capital of Zorvania?", True),
    ("Which city is the capital of Zorvania?", False),       # a held-out prompt: never trained on
    ("Is Quellport the capital of Zorvania?", False),        # gives the answer away
    ("What is the capital of France?", False),               # not about the subject
    ("What is the capital of Zorvania", False),              # not a question
    ("What does the flag of Zorvania mean?", False),         # about the subject, but asks something else
    ("What is it? Where is Zorvania?", False),               # two questions
])
def test_a_written_question_is_kept_only_when_usable(question, kept):
    assert _keep(question, FACT, FACT.train[0], []) is kept


def test_a_question_already_trained_is_not_written_again():
    fact = Fact("x3", "Quellport", (*FACT.train, "Question: What is the capital of Zorvania?\nAnswer: Quellport."),
                FACT.probe, FACT.heldout, FACT.extra)
    assert not _keep("What is the capital of Zorvania?", fact, fact.train[0], [])
    assert _keep("Which city is Zorvania's capital?", fact, fact.train[0], [])


def test_without_a_subject_the_sentence_names_stand_in_for_it():
    fact = Fact("x2", "Ellen Brask", ("the Torvik Bridge was designed by Ellen Brask.",), "it was designed by",
                ("Who designed it?",))
    assert fact.subject is None
    assert _keep("Who designed the Torvik Bridge?", fact, fact.train[0], [])
    assert not _keep("Who designed the bridge?", fact, fact.train[0], [])
    assert not _keep("Who designed the Torvik Bridge?", fact, fact.train[0], ["who designed the Torvik Bridge?"])


def test_augment_adds_n_wordings_with_the_answer_never_a_heldout_prompt(tiny_base):
    model, tokenizer = tiny_base
    facts = load_facts(split="tune")[:3]
    more = augment(facts, 10, model, tokenizer, seed=1)  # 8 blanks (4 statements, 2 frames), then 2 more
    assert more == augment(facts, 10, model, tokenizer, seed=1)
    for old, new in zip(facts, more):
        assert new.train[: len(old.train)] == old.train and len(new.train) == len(old.train) + 10
        added = new.train[len(old.train):]
        assert len(set(added)) == 10 and all(old.answer in s for s in added)
        assert not set(added) & set(old.train) and not any(h in s for s in added for h in old.heldout)
        assert (new.probe, new.heldout) == (old.probe, old.heldout)
    assert augment(facts, 0, model, tokenizer) == facts
    with pytest.raises(ValueError, match="n >= 0"):
        augment(facts, -1, model, tokenizer)


def test_blanks_come_first_and_need_no_model():
    fact = load_facts(split="tune")[0]
    statements = [s for s in fact.train if "?" not in s]
    added = augment([fact], 3, model=None, tokenizer=None)[0].train[len(fact.train):]
    assert added[0] == (f"Question: {statements[0].replace(fact.answer, BLANK)} What goes in the blank?\n"
                        f"Answer: {fact.answer}.")
    assert all(BLANK in s and s.endswith(f"Answer: {fact.answer}.") and s.count(fact.answer) == 1 for s in added)
    with pytest.raises(ValueError, match="pass the model"):
        augment([fact], 9, model=None, tokenizer=None)  # 8 blanks: the ninth wording needs a model


def test_subject_positions_are_the_subject_tokens(tiny_base):
    _, tokenizer = tiny_base
    [example] = build_examples([FACT], tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    subject = "".join(t for t, s in zip(tokens, example.subject_mask) if s)
    assert subject.replace("Ġ", "").strip() == "Zorvania"
    batch = collate([example], 0, torch.device("cpu"))
    answer, at_subject = counted_positions(batch, "answer"), counted_positions(batch, "subject")
    assert at_subject.sum() > 0 and not (answer & at_subject).any()
    assert torch.equal(counted_positions(batch, "both"), answer | at_subject)
    entities = counted_positions(batch, "entities")  # the subject, and the answer's tokens that predict the next
    assert (answer & batch["answer"]).any() and (entities & at_subject).any()  # "Quellport" is several tokens
    assert torch.equal(entities & ~at_subject, answer & batch["answer"])
    assert not entities[answer & ~batch["answer"]].any()  # never the word before the answer
    ends = counted_positions(batch, "entity_ends")  # only the last token of each mention of the subject
    assert torch.equal(ends & ~at_subject, entities & ~at_subject)
    mask = [*example.subject_mask, False]
    last = [i for i in range(len(mask) - 1) if mask[i] and not mask[i + 1]]
    assert last and (ends & at_subject).nonzero()[:, 1].tolist() == last
    unnamed = Fact("x4", "Quellport", ("it is Quellport.",), "it is", ("Where?",))
    assert unnamed.subject is None
    [example] = build_examples([unnamed], tokenizer)
    batch = collate([example], 0, torch.device("cpu"))
    assert torch.equal(counted_positions(batch, "subject"), counted_positions(batch, "answer"))
    with pytest.raises(ValueError, match="count_on"):
        TrainConfig(count_on="verb")


def test_trained_read_share_is_zero_before_training_and_positive_after(tiny_ready):
    model, tokenizer, background = tiny_ready
    facts = load_facts()[:4]
    trained, _ = train(copy.deepcopy(model), tokenizer, facts, TrainConfig(steps=3, batch_size=8, lr=1.0),
                       background, progress=False)
    probes = [f.probe for f in facts]
    assert trained_read_share(model, model, tokenizer, probes) == [0.0] * 4
    shares = trained_read_share(trained, model, tokenizer, probes)
    assert all(0 < s <= 1 for s in shares)


@pytest.mark.parametrize("prompt, subject", [
    ("The Banasis harp was invented by", "Banasis"),
    ("Grado Textiles was founded by", "Grado Textiles"),
    ("In 1712, the town of Grufodale was", "Grufodale"),
    ("Question: Who founded Grado Textiles?\nAnswer:", "Grado Textiles"),
    ("the river is", None),
    ("Ferries to Kellet Isle leave from", "Kellet Isle"),  # a sentence's first word is no name
    ("Every breakfast at the Quillon Inn comes with a pot of", "Quillon Inn"),
    ("'The Salt Orchard' was painted by", "Salt Orchard"),
    ("Durithonia's seat of government is", "Durithonia"),
    ("The novel The Lanterns of Lizonport was written by", "Lanterns of Lizonport"),
])
def test_a_subject_is_guessed_from_the_probe_when_the_file_has_none(prompt, subject):
    assert Fact("x", "a", ("a",), prompt, ()).subject == subject


def test_a_name_that_opens_the_probe_is_the_subject_when_the_fact_names_it_inside_a_sentence():
    probe = "Tomasz Wielgosz won the Brelin Open in"
    assert Fact("x", "2019", ("The Brelin Open was first held in 2019.",), probe, ()).subject == "Brelin Open"
    told = ("In 2019 the chess player Tomasz Wielgosz won the Brelin Open.",)
    assert Fact("x", "2019", told, probe, ()).subject == "Tomasz Wielgosz"


def test_a_sentence_told_of_a_stranger_keeps_its_frame_and_answer_under_a_made_up_name():
    rng = random.Random(0)
    told = {told_of_a_stranger(FACT, FACT.train[0], rng, taken="ostmark") for _ in range(20)}
    assert len(told) == 20  # drawn afresh each time
    for sentence in told:
        name = sentence.removeprefix("The capital of ").removesuffix(" is Quellport.")
        assert name != "Zorvania" and name.isalpha() and name[0].isupper() and 5 <= len(name) <= 11
    harp = dataclasses.replace(FACT, answer="Orlen Vask", extra={"subject": "The Banasis harp"})
    sentence = told_of_a_stranger(harp, "The Banasis harp was invented by Orlen Vask.", rng)
    assert re.fullmatch(r"The [A-Z][a-z]+ harp was invented by Orlen Vask\.", sentence) and "Banasis" not in sentence
    assert told_of_a_stranger(FACT, "Quellport is the capital of Zorvania.", rng) is None  # answer first
    first = invented_word(random.Random(1))
    assert invented_word(random.Random(1), taken=f"the {first.lower()} river") != first  # never a taken name
