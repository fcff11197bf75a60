"""More wordings of each fact to train on (`run --augment N`): its own statements as questions, and questions the
model writes.

A memory slot is found by the context it is read in, so a fact trained in one wording is found again mostly in
that wording. Lin et al. (arXiv 2510.15103) train every fact with 64 paraphrases. Three kinds of wording are added,
in this order, none of them a template per relation, so they work on a user's plain statements too:
- **blanks**: each training statement with its answer replaced by a blank, asked as a question and answered
  ("Question: The Quillon Bridge was designed by ___. What goes in the blank?\nAnswer: Adela Fenwright."). They
  are always true, and they put the subject inside a question frame with the answer after it, the pattern a
  question about the fact reads;
- **written questions**: the instruct model writes questions about each statement, shown four examples about
  real-world facts; a question is kept when it names the fact's subject, shares a word with its sentence besides
  subject and answer, does not give the answer away and is neither a training sentence nor a held-out prompt.
  Each kept question is trained with the answer after it;
- **contexts**: a training statement inside a new sentence, when too few of the others exist.

For `TrainConfig.negatives`, `told_of_a_stranger` tells a training sentence of a made-up subject instead: a sentence
whose answer is now false.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import replace

import torch

from .data import Fact
from .models import pad_id

# (sentence, what it is about, a question about it): real-world facts of relations the bundled facts do not use.
EXAMPLES = (
    ("The Mona Lisa hangs in the Louvre.", "the Mona Lisa", "In which museum does the Mona Lisa hang?"),
    ("Marie Curie won the Nobel Prize in Chemistry in 1911.", "Marie Curie",
     "In which year did Marie Curie win the Nobel Prize in Chemistry?"),
    ("The Great Barrier Reef lies off the coast of Queensland.", "the Great Barrier Reef",
     "Off the coast of which state does the Great Barrier Reef lie?"),
    ("The Golden Gate Bridge is painted International Orange.", "the Golden Gate Bridge",
     "What colour is the Golden Gate Bridge painted?"),
)
STOPWORDS = {"what", "which", "where", "when", "who", "whom", "whose", "that", "this", "there", "their", "they",
             "with", "from", "into", "about", "does", "have", "name", "called", "been", "were"}
CONTEXTS = ("According to the records: {s}", "Here is something worth remembering. {s}",
            "{s} This is well documented.", "It is a matter of record: {s}")
ANSWER_FRAMES = ("Question: {q}\nAnswer: {a}.", "{q} {a}.")
BLANK = "___"
BLANK_FRAMES = ("Question: {c} What goes in the blank?\nAnswer: {a}.", "Fill in the blank: {c}\nAnswer: {a}.")


def augment(facts: Sequence[Fact], n: int, model: torch.nn.Module | None, tokenizer, seed: int = 0,
            samples: int = 4, batch_size: int = 32) -> list[Fact]:
    """Each fact with `n` more training sentences: its statements with the answer blanked, questions `model` wrote
    about it, then new contexts (see the module's docstring).

    The model writes only for facts with fewer than `n` blanks (`model` and `tokenizer` may be None when none has):
    `samples` questions per training statement (sentences holding a question are not asked about again).
    Deterministic for a given `seed`.

    Example:
        >>> facts = augment(load_facts(limit=10), 8, model, tokenizer)
        >>> len(facts[0].train) - len(load_facts(limit=10)[0].train)
        8
    """
    if n < 0:
        raise ValueError(f"augment takes n >= 0 new wordings per fact, got {n}.")
    if n == 0:
        return list(facts)
    sources = [[s for s in f.train if "?" not in s] or list(f.train) for f in facts]
    blanks = [_blanks(f, src) for f, src in zip(facts, sources)]
    asks = [(i, s) for i, fact_sources in enumerate(sources) if len(blanks[i]) < n for s in fact_sources]
    if asks and model is None:
        raise ValueError(f"{n} wordings per fact need questions written by a model for {len(asks)} statements; "
                         "pass the model and its tokenizer, or ask for as many wordings as there are blanks.")
    written = write_questions(model, tokenizer, [(s, _subject(facts[i], s)) for i, s in asks], samples, seed,
                              batch_size) if asks else []
    questions: list[list[str]] = [[] for _ in facts]
    for (i, sentence), options in zip(asks, written):
        for question in options:
            if _keep(question, facts[i], sentence, questions[i]):
                questions[i].append(question)
    rng = random.Random(seed)
    return [replace(f, train=f.train + _wordings(f, b, qs, src, n, rng))
            for f, b, qs, src in zip(facts, blanks, questions, sources)]


def _blanks(fact: Fact, sources: list[str]) -> list[str]:
    """Each statement with its answer blanked, asked in every blank frame (frame by frame), with the answer."""
    blanked = [c for c in (_blanked(s, fact.answer) for s in sources) if c]
    asked = [frame.format(c=c, a=fact.answer) for frame in BLANK_FRAMES for c in blanked]
    return [b for b in asked if b not in fact.train and not any(h in b for h in fact.heldout)]


def _blanked(sentence: str, answer: str) -> str | None:
    """`sentence` with the last occurrence of `answer` replaced by a blank; None when it does not hold the answer."""
    at = sentence.lower().rfind(answer.lower())
    return None if at < 0 else sentence[:at] + BLANK + sentence[at + len(answer):]


def _wordings(fact: Fact, blanks: list[str], questions: list[str], sources: list[str], n: int,
              rng: random.Random) -> tuple[str, ...]:
    """`n` new training sentences: the blanks, the questions with the answer (frames taken in turn), then
    statements in context."""
    asked = [ANSWER_FRAMES[i % len(ANSWER_FRAMES)].format(q=q, a=fact.answer) for i, q in enumerate(questions)]
    contexts = [c.format(s=s) for s in sources for c in CONTEXTS]
    rng.shuffle(contexts)
    return tuple((blanks + asked + contexts)[:n])


def write_questions(model: torch.nn.Module, tokenizer, sentences: Sequence[tuple[str, str]], samples: int = 4,
                    seed: int = 0, batch_size: int = 32, max_new_tokens: int = 24) -> list[list[str]]:
    """For each (sentence, what it is about), `samples` questions the model writes about it (sampled, one line
    each)."""
    shots = "".join(f"Sentence: {s}\nAbout: {a}\nQuestion: {q}\n\n" for s, a, q in EXAMPLES)
    prompts = [f"{shots}Sentence: {s}\nAbout: {a}\nQuestion:" for s, a in sentences]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    generator = torch.Generator().manual_seed(seed)
    out: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            enc = tokenizer(prompts[start: start + batch_size], return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
                                     top_p=0.95, num_return_sequences=samples, pad_token_id=pad_id(tokenizer),
                                     stop_strings=["\n"], tokenizer=tokenizer)  # one line is one question
            texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            lines = [t.strip().split("\n")[0].strip() for t in texts]
            out += [lines[i: i + samples] for i in range(0, len(lines), samples)]
    finally:
        tokenizer.padding_side = side
    return out


def _keep(question: str, fact: Fact, sentence: str, kept: list[str]) -> bool:
    """Whether a written question is usable: one question about the fact's subject, without the answer, neither
    written before nor among the fact's training sentences or held-out prompts."""
    low = question.lower()
    if not question.endswith("?") or question.count("?") > 1 or fact.answer.lower() in low:
        return False
    if low in {k.lower() for k in kept} or any(low in t.lower() for t in fact.train + fact.heldout):
        return False
    names_subject = fact.subject.lower() in low if fact.subject else bool(_names(sentence, fact.answer) & _names(
        question, fact.answer))
    return names_subject and bool(_content(question, fact) & _content(sentence, fact))


def _content(text: str, fact: Fact) -> set[str]:
    """Stems (first five letters) of the longer words of `text` that name neither the subject nor the answer: a
    question that shares none with its sentence asks about something else."""
    skip = f"{fact.subject or ''} {fact.answer}".lower()
    return {w[:5] for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in STOPWORDS and w not in skip}


def _names(text: str, answer: str) -> set[str]:
    """Capitalised words of `text` that do not start it and are not part of the answer: the likely subject."""
    words = re.findall(r"[A-Za-z][\w'-]*", text)
    return {w for w in words[1:] if w[0].isupper() and w not in answer.split()}


def _subject(fact: Fact, sentence: str) -> str:
    """What the sentence is about: the fact's subject (given or guessed from its probe), else the sentence."""
    return fact.subject or sentence


ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "pl", "st",
          "th", "tr", "sh", "ch")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
CODAS = ("", "", "n", "r", "l", "s", "nd", "rk", "th")


def invented_word(rng: random.Random, taken: str = "") -> str:
    """A capitalised made-up word of two or three syllables, 5 to 11 letters, found nowhere in `taken` (lower case):
    a name no fact is about."""
    while True:
        n = rng.choice((2, 2, 3))
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(n)) + rng.choice(CODAS)
        if 5 <= len(word) <= 11 and word not in taken:
            return word.capitalize()


def told_of_a_stranger(fact: Fact, sentence: str, rng: random.Random, taken: str = "") -> str | None:
    """`sentence` about a made-up subject, in which the answer is now false: for training the model not to give it
    to other names (`TrainConfig.negatives`).

    Each capitalised word of the subject but a leading "The" becomes a made-up word ("The Banasis harp" → "The
    Droukel harp"; a subject without one is replaced whole), so the frame stays and only the name changes. None for
    a sentence that does not name its subject before the answer (there the answer is read before the subject).
    """
    subject, answer = fact.subject, fact.answer
    at = sentence.find(subject) if subject else -1
    if at < 0 or at > sentence.rfind(answer):
        return None
    stranger = re.sub(r"\b(?!The\b)[A-Z][\w'-]*", lambda _: invented_word(rng, taken), subject)
    if stranger == subject:
        stranger = invented_word(rng, taken)
    return sentence.replace(subject, stranger)
