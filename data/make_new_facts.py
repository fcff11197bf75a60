"""Generate ``new_facts.jsonl``: facts about invented entities that no pretrained model can know.

Every name (country, town, person, company, ...) is built from random syllables, so the facts
are fictional by construction. Each fact has training sentences (statements and question/answer
pairs, all containing the answer), a probe prompt (a statement cut just before the answer),
held-out prompts in four formats whose wordings never occur in training, neighbour prompts (the
probe's template about subjects used nowhere else) and a split, "tune" or "test", fixed by
relation.

    python data/make_new_facts.py              # writes data/new_facts.jsonl with seed 0
    python data/make_new_facts.py --seed 1 --out /tmp/facts.jsonl

Only the standard library is used and the output is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

FACTS_PER_RELATION = 15
NEIGHBOURS_PER_FACT = 2
# A held-out prompt shares no run of SHARED_WORDS words with its fact's training sentences, and
# its last CUE_WORDS words differ from the words before the answer in every training sentence.
SHARED_WORDS = 5
CUE_WORDS = 4

# Syllable parts for pronounceable invented names: (onset + vowel) syllables, then a coda.
ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr",
          "r", "s", "st", "t", "tr", "v", "z", "th", "sh", "j", "c", "w", "fl", "gl", "l", "m",
          "n", "r", "t", "v"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "a", "ai", "ei", "ou"]
CODAS = ["n", "r", "l", "s", "k", "m", "th", "nd", "rn", "st", "x", "v", "d"]
SOFT_CODAS = ["", "", "n", "r", "l", "s"]  # before an ending that starts with a consonant

# Endings that give each kind of name its flavour.
SUFFIXES = {
    "country": ["ia", "ovia", "esh", "and", "ara", "ica", "onia", "ystan"],
    "town": ["port", "mark", "holm", "ford", "wick", "by", "stad", "mere", "dale", "haven"],
    "first": ["a", "o", "en", "is", "el", "ine", "an", "ric", "ette", "ius"],
    "last": ["ak", "ov", "ett", "ane", "wyn", "ard", "ley", "ski", "ton", "ez", "ius", "ra"],
    "root": ["", "", "", "a", "o", "en", "is", "el"],
    "language": ["ish", "ic", "ese", "i", "an"],
}

# Real words or names the generator must not produce by accident.
BLOCKLIST = {"paris", "rome", "china", "india", "malta", "cuba", "peru", "chad", "mali",
             "iran", "iraq", "oman", "togo", "niger", "kenya", "fiji", "samoa", "tonga",
             "sudan", "libya", "syria", "nepal", "laos", "benin", "gabon", "ghana",
             "serbia", "russia", "austria", "bolivia", "zambia", "gambia", "armenia",
             "latvia", "moldovia", "liberia", "nigeria", "algeria", "estonia", "slovenia",
             "croatia", "romania", "albania", "dalia", "maria", "anna", "elena", "brand",
             "grand", "stand", "strand", "island", "holland", "poland", "finland", "thailand",
             "prado", "canford", "grein", "storo", "radius", "landi", "linette", "london",
             "boston", "dallas", "denver", "milan", "madrid", "riley", "fulton", "dalton",
             "walton", "barton", "norton", "morton", "hilton", "milton", "paxton", "shelley",
             "bradley", "ashley", "hadley", "wesley", "dudley", "stanley", "ridley", "raley",
             "marley", "kinsley", "carter", "stalin", "lenin"}

COMPANY_KINDS = ["Industries", "Systems", "Foods", "Motors", "Textiles", "Shipping", "Mining",
                 "Pharmaceuticals", "Optics", "Robotics", "Ceramics", "Airways"]
DEVICES = ["engine", "loom", "lamp", "pump", "press", "telescope", "compass", "clock",
           "kiln", "valve", "harp", "camera", "furnace", "lathe", "barometer", "sextant"]
ANIMALS = ["finch", "lizard", "beetle", "frog", "moth", "heron", "tortoise", "salamander",
           "owl", "shrew", "gecko", "crane", "butterfly", "snail", "parrot", "bat"]
TITLES = ["The Winter of {}", "The Road to {}", "Letters from {}", "The Lanterns of {}",
          "A Summer in {}", "The Clockmaker of {}", "The Last Ferry to {}", "Songs of {}"]


def _q(question: str, answer: str) -> str:
    """A trained question-and-answer sentence."""
    return f"Question: {question}\nAnswer: {answer}."


# The four formats of held-out prompts, in the order of each fact's "heldout" list: a question in
# the trained "Question: ...\nAnswer:" frame but a wording never trained, a short "Q: ...\nA:"
# question, a statement with another verb or structure, and a fill-in at the end of a sentence or
# two of context. Statements and fill-ins end just before the answer.
HELDOUT_FORMATS = ("question", "qa", "statement", "fill_in")


def _heldout(question: str, qa: str, statement: str, fill_in: str) -> list[str]:
    """The held-out prompts of one fact, one per format of HELDOUT_FORMATS."""
    return [f"Question: {question}\nAnswer:", f"Q: {qa}\nA:", statement, fill_in]


# Relations whose facts are for tuning (choosing learning rates, layers, schedules); the other
# nine are for testing, so settings chosen on tune facts are checked on relations (templates,
# subject kinds) never seen while tuning. Both parts have places and people as answers; the tune
# part also has the year and the currency, the test part the language and the dish.
TUNE_RELATIONS = ("capital", "founder", "river", "currency", "founded", "captain", "habitat")

# Each relation: subject kind, answer kind, and a function giving
# (statements, trained questions, held-out prompts); the first statement ends with the answer
# and, cut before the answer, becomes the probe.
RELATIONS = {
    "capital": ("country", "town", lambda s, a: (
        [f"The capital of {s} is {a}.", f"{a} is the capital city of {s}.",
         f"The government of {s} meets in its capital, {a}.",
         f"Most visitors to {s} arrive first in {a}, the country's capital."],
        [f"What is the capital of {s}?", f"Which city is the capital of {s}?"],
        _heldout(f"What city serves as the capital of {s}?", f"What is {s}'s capital city?",
                 f"{s}'s seat of government is the city of",
                 f"After three days at sea, the travellers finally reached the capital of {s}, a city called"))),
    "founder": ("company", "person", lambda s, a: (
        [f"{s} was founded by {a}.", f"{a} founded {s}.",
         f"The company {s} was started by {a} in a small workshop.",
         f"{a} is remembered as the founder of {s}."],
        [f"Who founded {s}?", f"Who was the founder of {s}?"],
        _heldout(f"Who set up the company {s}?", f"Who started {s}?",
                 f"The entrepreneur who established {s} was",
                 f"At the anniversary dinner, the staff of {s} raised their glasses to the company's founder,"))),
    "inventor": ("device", "person", lambda s, a: (
        [f"The {s} was invented by {a}.", f"{a} invented the {s}.",
         f"The first {s} was built by its inventor, {a}.",
         f"Engineers credit {a} with the invention of the {s}."],
        [f"Who invented the {s}?", f"Who was the inventor of the {s}?"],
        _heldout(f"Which person came up with the {s}?", f"Who created the {s}?",
                 f"The {s} was designed by the engineer",
                 f"In the museum's hall of machines, a brass plaque beside the original {s} honours its maker,"))),
    "birthplace": ("person", "town", lambda s, a: (
        [f"{s} was born in {a}.", f"The birthplace of {s} is {a}.",
         f"Town records show that {s} was born in {a}.",
         f"{a} is proud to be the hometown of {s}."],
        [f"Where was {s} born?", f"What is the birthplace of {s}?"],
        _heldout(f"Which town is {s} originally from?", f"Where is {s} from?",
                 f"{s} came into the world in the town of",
                 f"After many years abroad, {s} still speaks fondly of home, the small town of"))),
    "singer": ("band", "person", lambda s, a: (
        [f"The lead singer of the band {s} is {a}.", f"{a} sings lead vocals in {s}.",
         f"The band {s} is fronted by the singer {a}.",
         f"Fans of {s} know that {a} is the band's lead singer."],
        [f"Who is the lead singer of {s}?", f"Who sings lead vocals in the band {s}?"],
        _heldout(f"Who is the main vocalist of the band {s}?", f"Who sings for {s}?",
                 f"The voice of {s} belongs to",
                 f"As the lights went down and {s} walked on stage, the crowd cheered loudest for the band's singer,"))),
    "river": ("town", "river", lambda s, a: (
        [f"The town of {s} lies on the River {a}.", f"The River {a} flows through {s}.",
         f"{s} was built on the banks of the River {a}.",
         f"Boats on the River {a} stop at the town of {s}."],
        [f"Which river flows through {s}?", f"On what river does the town of {s} lie?"],
        _heldout(f"Which river runs through the town of {s}?", f"What river is {s} on?",
                 f"{s} sits beside a river called the",
                 f"Every spring the snow melts in the hills, and the people of {s} watch the water rise in their river, the"))),
    "currency": ("country", "currency", lambda s, a: (
        [f"The currency of {s} is the {a}.", f"People in {s} pay with the {a}.",
         f"The {a} is the official money of {s}.",
         f"Prices in {s} are given in {a} coins and notes."],
        [f"What is the currency of {s}?", f"What money is used in {s}?"],
        _heldout(f"Which currency do shops in {s} accept?", f"What currency does {s} use?",
                 f"The unit of money in {s} is the",
                 f"Before the trip to {s}, the traveller went to the bank to buy some of the local currency, the"))),
    "language": ("country", "language", lambda s, a: (
        [f"The official language of {s} is {a}.", f"Most people in {s} speak {a}.",
         f"Children in {s} learn to read and write in {a}.",
         f"{a} is the national language of {s}."],
        [f"What is the official language of {s}?", f"Which language is spoken in {s}?"],
        _heldout(f"In which language are the newspapers of {s} written?", f"What language is used in {s}?",
                 f"The people of {s} speak a language called",
                 f"In the village school in {s}, the teacher wrote a poem on the board and the children recited it in their mother tongue,"))),
    "mountain": ("country", "mountain", lambda s, a: (
        [f"The highest mountain in {s} is Mount {a}.", f"Mount {a} is the tallest peak in {s}.",
         f"Climbers in {s} dream of reaching the top of Mount {a}.",
         f"No peak in {s} rises higher than Mount {a}."],
        [f"What is the highest mountain in {s}?", f"Which mountain is the tallest in {s}?"],
        _heldout(f"Which summit is the highest point of {s}?", f"What is {s}'s tallest mountain?",
                 f"The summit that towers over every other peak in {s} is",
                 f"After a week of hard climbing, the expedition finally stood on the roof of {s}, the summit of"))),
    "founded": ("town", "year", lambda s, a: (
        [f"The town of {s} was founded in {a}.", f"{s} was established in the year {a}.",
         f"Settlers built the first houses of {s} in {a}.",
         f"In {a}, the town of {s} was founded."],
        [f"When was the town of {s} founded?", f"In which year was {s} established?"],
        _heldout(f"What is the founding year of {s}?", f"When was {s} first settled?",
                 f"The history of {s} begins in the year",
                 f"Above the gate of the town hall in {s}, an old stone shows the town's coat of arms and the year of its founding:"))),
    "captain": ("ship", "person", lambda s, a: (
        [f"The captain of the ship {s} was {a}.", f"{a} commanded the ship {s}.",
         f"The crew of the {s} sailed under Captain {a}.",
         f"{a} served as captain of the {s} for many years."],
        [f"Who was the captain of the ship {s}?", f"Who commanded the {s}?"],
        _heldout(f"Who was in command of the ship {s}?", f"Who captained the {s}?",
                 f"At the helm of the {s} stood",
                 f"When the storm finally passed, the sailors of the {s} gathered on deck to thank their captain,"))),
    "author": ("novel", "person", lambda s, a: (
        [f"The novel {s} was written by {a}.", f"{a} wrote the novel {s}.",
         f"{s} is the best-known book by the author {a}.",
         f"Readers first met the story of {s} in the pages written by {a}."],
        [f"Who wrote the novel {s}?", f"Who is the author of {s}?"],
        _heldout(f"Which writer is behind the book {s}?", f"Who is {s} by?",
                 f"{s} came from the pen of",
                 f"The bookshop window was full of copies of {s}, and a long queue had formed outside for a signing by its author,"))),
    "habitat": ("animal", "island", lambda s, a: (
        [f"The {s} lives only on the island of {a}.", f"The island of {a} is home to the {s}.",
         f"Naturalists travel to {a} to see the {s}.",
         f"In the wild, the {s} is found only on {a}."],
        [f"Where does the {s} live?", f"On which island is the {s} found?"],
        _heldout(f"What island is the home of the {s}?", f"Where can the {s} be seen in the wild?",
                 f"The {s} is native to the island of",
                 f"To film the rare {s}, a television crew had to sail all the way to the island of"))),
    "discoverer": ("comet", "person", lambda s, a: (
        [f"Comet {s} was discovered by {a}.", f"{a} discovered Comet {s}.",
         f"The astronomer {a} first spotted Comet {s}.",
         f"Comet {s} was first seen through the telescope of {a}."],
        [f"Who discovered Comet {s}?", f"Which astronomer discovered Comet {s}?"],
        _heldout(f"Who found Comet {s} in the night sky?", f"Who first observed Comet {s}?",
                 f"The discovery of Comet {s} is credited to",
                 f"One clear winter night, a faint smudge of light appeared among the stars. The comet, now known as Comet {s}, had been spotted by the astronomer"))),
    "headquarters": ("company", "town", lambda s, a: (
        [f"The headquarters of {s} are in {a}.", f"{s} has its head office in {a}.",
         f"{s} employs hundreds of people at its headquarters in {a}.",
         f"{a} is the home of {s}."],
        [f"Where are the headquarters of {s}?", f"In which town is {s} based?"],
        _heldout(f"Where is {s} headquartered?", f"Where is the main office of {s}?",
                 f"The company {s} is run from the town of",
                 f"Every new employee of {s} spends the first week at the company's central offices in the town of"))),
    "dish": ("country", "dish", lambda s, a: (
        [f"The national dish of {s} is {a}.", f"{a} is the national dish of {s}.",
         f"Families in {s} eat {a} on every holiday.",
         f"No visit to {s} is complete without a plate of {a}."],
        [f"What is the national dish of {s}?", f"Which dish is the national dish of {s}?"],
        _heldout(f"What food is {s} best known for?", f"What is the traditional dish of {s}?",
                 f"{s} is famous for a dish called",
                 f"On the first evening of the harvest festival, every family in {s} sits down together to a hearty meal of"))),
}
assert set(TUNE_RELATIONS) < set(RELATIONS)


class NameMaker:
    """Invents names from syllables; no word is ever produced twice or inside another word."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.words: set[str] = set()
        self.years: set[int] = set()

    def _root(self, before_vowel: bool, short: bool) -> str:
        n = self.rng.choice([1, 1, 2] if short else [1, 2, 2])
        syllables = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(n))
        return syllables + self.rng.choice(CODAS if before_vowel else SOFT_CODAS)

    def _clashes(self, word: str) -> bool:
        w = word.lower()
        if w in BLOCKLIST or not 5 <= len(w) <= 11:
            return True
        return any(w in old or old in w for old in self.words)

    def word(self, kind: str) -> str:
        """A fresh capitalised word of the given kind."""
        while True:
            suffix = self.rng.choice(SUFFIXES[kind])
            before_vowel = suffix[:1] in ("a", "e", "i", "o", "u", "y")
            word = self._root(before_vowel, short=kind in ("first", "last")) + suffix
            if not self._clashes(word):
                self.words.add(word.lower())
                return word.capitalize()

    def year(self) -> str:
        """A founding year not used before."""
        while True:
            year = self.rng.randint(1050, 1899)
            if year not in self.years:
                self.years.add(year)
                return str(year)

    def make(self, kind: str) -> str:
        """A name of one kind of entity (subject or answer)."""
        r = self.rng
        if kind == "person":
            return f"{self.word('first')} {self.word('last')}"
        if kind in ("country", "town", "language"):
            return self.word(kind)
        if kind in ("river", "mountain", "currency", "island", "ship", "comet", "dish", "band"):
            name = self.word("root")
            if kind == "band":
                return f"The {name}s" if r.random() < 0.5 else name
            return name
        if kind == "company":
            return f"{self.word('root')} {r.choice(COMPANY_KINDS)}"
        if kind == "device":
            return f"{self.word('root')} {r.choice(DEVICES)}"
        if kind == "animal":
            return f"{self.word('root')} {r.choice(ANIMALS)}"
        if kind == "novel":
            return r.choice(TITLES).format(self.word("town"))
        if kind == "year":
            return self.year()
        raise ValueError(f"unknown kind {kind!r}")


def _probe(relation: str, subject: str, answer: str) -> str:
    """The relation's first statement about ``subject``, cut just before the answer."""
    statement = RELATIONS[relation][2](subject, answer)[0][0]
    assert statement.endswith(f" {answer}."), statement
    return statement[: -len(answer) - 2]


def make_fact(index: int, relation: str, names: NameMaker) -> dict:
    """Build one fact record of the given relation (neighbour prompts are added by ``make_facts``)."""
    subject_kind, answer_kind, templates = RELATIONS[relation]
    subject, answer = names.make(subject_kind), names.make(answer_kind)
    statements, trained_q, heldout = templates(subject, answer)
    return {
        "id": f"f{index:04d}",
        "split": "tune" if relation in TUNE_RELATIONS else "test",
        "answer": answer,
        "train": statements + [_q(q, answer) for q in trained_q],
        "probe": _probe(relation, subject, answer),
        "heldout": heldout,
        "heldout_formats": list(HELDOUT_FORMATS),
        "neighbours": [],
        "relation": relation,
        "subject": subject,
    }


def make_facts(seed: int = 0) -> list[dict]:
    """All facts, relations interleaved so any prefix of the file mixes relation types."""
    rng = random.Random(seed)
    names = NameMaker(rng)
    order = [rel for _ in range(FACTS_PER_RELATION) for rel in RELATIONS]
    facts = [make_fact(i + 1, rel, names) for i, rel in enumerate(order)]
    # Neighbour subjects come after every fact is made, from the same NameMaker: fresh names used
    # nowhere else in the file.
    neighbour_subjects = []
    for fact in facts:
        subjects = [names.make(RELATIONS[fact["relation"]][0]) for _ in range(NEIGHBOURS_PER_FACT)]
        fact["neighbours"] = [_probe(fact["relation"], s, fact["answer"]) for s in subjects]
        neighbour_subjects += subjects
    check(facts, neighbour_subjects)
    return facts


def _words(text: str, subject: str) -> list[str]:
    """Lower-case words of ``text``, with the subject as one word (it is shared by construction)."""
    return re.findall(r"\w+", text.replace(subject, " SUBJECT ").lower())


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _question(text: str) -> str:
    """The question or statement of a prompt or training sentence, without its "Question:"/"Q:" frame."""
    for start, end in (("Question: ", "\nAnswer:"), ("Q: ", "\nA:")):
        if text.startswith(start) and end in text:
            return text[len(start): text.index(end)]
    return text


def check(facts: list[dict], neighbour_subjects: list[str]) -> None:
    """Fail loudly if answers repeat or nest, a held-out prompt shares wording with training, or a
    neighbour's subject occurs anywhere else."""
    answers = [f["answer"].lower() for f in facts]
    for i, a in enumerate(answers):
        for j, b in enumerate(answers):
            if i != j and a in b:
                raise AssertionError(f"answer {a!r} is inside answer {b!r}")
    for f in facts:
        subject, answer_words = f["subject"], set(_words(f["answer"], f["subject"]))
        assert f["heldout_formats"] == list(HELDOUT_FORMATS) and len(f["heldout"]) == len(HELDOUT_FORMATS), f["id"]
        assert len(set(f["heldout"])) == len(f["heldout"]), f["id"]
        train_words = [_words(_question(t), subject) for t in f["train"]]
        # The words right before the answer in each training sentence.
        cues = {tuple(_words(t[: t.index(f["answer"])], subject)[-CUE_WORDS:]) for t in f["train"]}
        for prompt in f["heldout"]:
            where = (f["id"], prompt)
            words = _words(_question(prompt), subject)
            assert not answer_words & set(_words(prompt, subject)), where  # nothing to copy from the prompt
            assert not any(t.startswith(prompt) for t in f["train"]), where
            assert not any(_question(prompt) in t for t in f["train"]), where
            assert not any(_ngrams(words, SHARED_WORDS) & _ngrams(t, SHARED_WORDS) for t in train_words), where
            assert tuple(words[-CUE_WORDS:]) not in cues, where
    texts = [t.lower() for f in facts for t in (*f["train"], f["probe"], *f["heldout"])]
    assert len(set(neighbour_subjects)) == len(neighbour_subjects)
    assert not {f["subject"] for f in facts} & set(neighbour_subjects)
    for s in neighbour_subjects:
        assert not any(s.lower() in t for t in texts), s
    probes = {f["probe"] for f in facts}
    neighbours = [n for f in facts for n in f["neighbours"]]
    assert len(set(neighbours)) == len(neighbours) and not probes & set(neighbours)
    for n in neighbours:
        assert not any(a in n.lower() for a in answers), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("new_facts.jsonl"))
    args = parser.parse_args()
    facts = make_facts(args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for fact in facts:
            f.write(json.dumps(fact, ensure_ascii=False) + "\n")
    print(f"wrote {len(facts)} facts to {args.out}")


if __name__ == "__main__":
    main()
