"""Loading the bundled data sets: new facts to teach, known facts, held-out text, background text.

All files are JSON Lines (one JSON object per line, blank lines skipped). A malformed line raises
``DataFormatError`` with the file, the 1-based line number, what is wrong and how to fix it.
``load_facts(split="tune")`` or ``split="test"`` keeps one part of the facts, as fixed by their
``split`` key: settings are chosen on the tune part and figures reported on the test part.

Every loader also takes a ``datasets.Dataset`` (or any iterable of dicts) or, when the string is not a
local file, a Hugging Face hub dataset id ``"owner/name"`` or ``"owner/name:split"`` (split ``train`` by
default). Their rows pass the same checks; an error names the dataset and the 0-based row, as in
``dataset[row]``. ``facts_dataset``, ``known_facts_dataset`` and ``texts_dataset`` return the sets as
``datasets.Dataset`` objects. The ``datasets`` package is imported only when one of these is used.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .hub import hub_reachable

if TYPE_CHECKING:
    import datasets

DATA_DIR = Path(os.environ.get("SMF_DATA_DIR", Path(__file__).resolve().parent.parent / "data"))


class DataFormatError(ValueError):
    """A line of a data file does not follow the expected format."""


@dataclass(frozen=True)
class Fact:
    """A new fact to teach: training sentences, a probe prompt and held-out prompts.

    Optional keys of the file are kept in ``extra``; ``split``, ``neighbours`` and ``heldout_formats``
    read the ones the evaluation uses.
    """

    id: str
    answer: str
    train: tuple[str, ...]
    probe: str
    heldout: tuple[str, ...]
    extra: dict = field(default_factory=dict)

    @property
    def split(self) -> str | None:
        """"tune" or "test": which part of the evaluation the fact belongs to (None if not given)."""
        return self.extra.get("split")

    @property
    def subject(self) -> str | None:
        """What the fact is about (e.g. "Durithonia"): the file's `subject`, else a guess from the probe (see
        `guess_subject`, with the fact's other sentences as context), else None."""
        return self.extra.get("subject") or guess_subject(self.probe, (*self.train, *self.heldout))

    @property
    def neighbours(self) -> tuple[str, ...]:
        """Prompts of the probe's relation about other, untrained subjects: they must not get this answer."""
        return tuple(self.extra.get("neighbours", ()))

    @property
    def heldout_formats(self) -> tuple[str, ...]:
        """The format of each held-out prompt ("question", "qa", "statement", "fill_in"), if given."""
        return tuple(self.extra.get("heldout_formats", ()))


# Capitalised words that start sentences, questions and prompt frames rather than name anything.
_NOT_NAMES = {"The", "A", "An", "In", "On", "At", "Of", "It", "Its", "This", "That", "There", "Their", "His", "Her",
              "Question", "Answer", "Q", "Who", "What", "Which", "Where", "When", "Why", "How"}


def guess_subject(prompt: str, context: Sequence[str] = ()) -> str | None:
    """The first run of capitalised words (or joined by "of") in `prompt` that names something, less the articles,
    question words and frame labels that start it and a possessive ending (None if there is none): "The Banasis harp
    was invented by" -> "Banasis".

    A capital at the start of a sentence says nothing, so a run that opens one is taken only when no later run is
    left, or when `context` (the fact's other sentences) capitalises its first word inside a sentence too: "Ferries
    to Kellet Isle leave from" -> "Kellet Isle", "Grado Textiles was founded by" -> "Grado Textiles".
    """
    fallback = None
    for run in re.finditer(r"\b[A-Z][\w'-]*(?:\s+(?:of\s+)?[A-Z][\w'-]*)*", prompt):
        words = run.group().split()
        while words and words[0] in _NOT_NAMES:
            words = words[1:]
        if not words:
            continue
        name = re.sub(r"'s?$", "", " ".join(words))
        opens = len(words) == len(run.group().split()) and _opens_sentence(prompt, run.start())
        if not opens or _named_inside_a_sentence(words[0], context):
            return name
        fallback = fallback or name
    return fallback


def _opens_sentence(text: str, index: int) -> bool:
    """Whether only spaces, quotes or brackets stand between `index` and the start of its sentence (or line)."""
    return re.search(r"(?:^|[.!?:\n])[\s\"'“‘(\[—-]*$", text[:index]) is not None


def _named_inside_a_sentence(word: str, texts: Sequence[str]) -> bool:
    """Whether some text capitalises `word` where no sentence starts: a name, not a sentence's first word."""
    return any(not _opens_sentence(text, m.start()) for text in texts
               for m in re.finditer(rf"\b{re.escape(word)}\b", text))


@dataclass(frozen=True)
class KnownFact:
    """A fact the base model may already know, used to measure forgetting."""

    id: str
    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()

    def answers(self) -> tuple[str, ...]:
        """All accepted answers: the main answer first, then the aliases."""
        return (self.answer, *self.aliases)


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("FILE:LINE", object) for each non-blank line of a JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                                      "each line must be one complete JSON object") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{where}: expected a JSON object {{...}}, "
                                      f"got {type(record).__name__}")
            yield where, record


def _text(record: dict, key: str, where: str) -> str:
    """The non-empty string under ``key``, or a DataFormatError."""
    if key not in record:
        raise DataFormatError(f"{where}: missing key {key!r}; add it to the object")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _texts(record: dict, key: str, where: str, required: bool = True) -> tuple[str, ...]:
    """The list of non-empty strings under ``key`` (non-empty when required), or a DataFormatError."""
    if key not in record and not required:
        return ()
    if key not in record:
        raise DataFormatError(f"{where}: missing key {key!r}; add a list of strings")
    value = record[key]
    if (not isinstance(value, list) or (required and not value)
            or not all(isinstance(v, str) and v.strip() for v in value)):
        kind = "a non-empty list" if required else "a list"
        raise DataFormatError(f"{where}: {key!r} must be {kind} of non-empty strings, got {value!r}")
    return tuple(value)


def _unique_id(record: dict, where: str, seen: set[str]) -> str:
    """The record's id, checked to be new."""
    id_ = _text(record, "id", where)
    if id_ in seen:
        raise DataFormatError(f"{where}: duplicate id {id_!r}; every line or row needs its own id")
    seen.add(id_)
    return id_


# A local file path, a hub dataset id "owner/name[:split]", a datasets.Dataset or other rows of dicts.
Source: TypeAlias = "str | Path | datasets.Dataset | Iterable[dict[str, Any]] | None"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")
_FILE_SUFFIXES = {".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zip", ".py"}


def _is_hub_id(text: str) -> bool:
    """Whether ``text`` looks like "owner/name[:split]" rather than a file path, and is no local file."""
    return (_HUB_ID.fullmatch(text) is not None and not os.path.exists(text)
            and Path(text.split(":")[0]).suffix.lower() not in _FILE_SUFFIXES)


def _datasets() -> Any:
    """The ``datasets`` package, imported on first use."""
    try:
        import datasets
    except ImportError:
        raise ModuleNotFoundError("Hugging Face datasets support needs the `datasets` package: "
                                  "pip install datasets") from None
    return datasets


def _hub_dataset(spec: str) -> datasets.Dataset:
    """Load the hub dataset "owner/name[:split]", failing within seconds when the hub is unreachable."""
    from huggingface_hub import constants

    name, _, split = spec.partition(":")
    unreachable = (f"data file not found: {spec!r} does not exist locally, and the Hugging Face hub is "
                   "unreachable (offline), so it cannot be loaded as a hub dataset id either")
    # In offline mode set before start-up, load_dataset fails at once or uses the local cache.
    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise FileNotFoundError(unreachable)
    datasets = _datasets()
    try:
        return datasets.load_dataset(name, split=split or "train")
    except ConnectionError:
        raise FileNotFoundError(unreachable) from None
    except Exception as e:  # unknown id, missing split, bad files: one clear line instead
        reason = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"data file not found: {spec!r} does not exist locally, and loading it from "
                                f"the Hugging Face hub failed: {type(e).__name__}: {reason}") from None


def _rows(rows: Iterable[Any], label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("LABEL row N", record) for each row of a dataset; None values count as missing keys."""
    for number, row in enumerate(rows):
        where = f"{label} row {number}"
        if not isinstance(row, dict):
            raise DataFormatError(f"{where}: expected a dict per row, got {type(row).__name__} "
                                  "(for a DatasetDict, pass one split, e.g. dataset['train'])")
        yield where, {k: v for k, v in row.items() if v is not None}


def _label(source: Source, name: str) -> str:
    """How errors name a source: its file path, its hub dataset id, or "dataset"."""
    if source is None:
        return str(DATA_DIR / name)
    if isinstance(source, (str, os.PathLike)):
        return str(source) if isinstance(source, str) and _is_hub_id(source) else str(Path(source))
    return "dataset"


def _source(source: Source, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of a local file, a hub dataset id, a dataset object, or the bundled file ``name``."""
    if source is None:
        return _records(DATA_DIR / name)
    if isinstance(source, str) and _is_hub_id(source):
        return _rows(_hub_dataset(source), source)
    if isinstance(source, (str, os.PathLike)):
        return _records(Path(source))
    return _rows(source, "dataset")


SPLITS = ("tune", "test")


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'tune', 'test' or None (all of them)")


def _in_split(record: dict, where: str, split: str | None) -> bool:
    """Whether a record belongs to `split` (None: every record); a bad "split" value is an error."""
    if "split" in record and record["split"] not in SPLITS:
        raise DataFormatError(f"{where}: 'split' must be 'tune' or 'test', got {record['split']!r}")
    return split is None or record.get("split") == split


def _nothing_in_split(path: Source, name: str, split: str, with_split: int) -> DataFormatError:
    found = (f"no line has \"split\": \"{split}\"" if with_split
             else f"no line has a \"split\" key, so split={split!r} selects nothing")
    return DataFormatError(f"{_label(path, name)}: {found}; add \"split\": \"tune\" or \"test\" to the lines, "
                           "or load with split=None for all of them")


def load_facts(path: Source = None, limit: int | None = None, split: str | None = None) -> list[Fact]:
    """Load new facts (default ``data/new_facts.jsonl``), optionally only the first ``limit``.

    ``split`` ("tune" or "test") keeps only the facts whose ``split`` key has that value, ``limit``
    then counting among them; None keeps every fact, with or without a ``split`` key.
    """
    _check_split(split)
    facts: list[Fact] = []
    seen: set[str] = set()
    with_split = 0  # facts that have a "split" key
    for where, record in _source(path, "new_facts.jsonl"):
        if limit is not None and len(facts) >= limit:
            break
        id_ = _unique_id(record, where, seen)
        answer = _text(record, "answer", where)
        train = _texts(record, "train", where)
        for sentence in train:
            if answer not in sentence:
                raise DataFormatError(f"{where}: train sentence {sentence!r} does not contain "
                                      f"the answer {answer!r}; every train sentence must")
        probe = _text(record, "probe", where)
        heldout = _texts(record, "heldout", where)
        _texts(record, "neighbours", where, required=False)
        formats = _texts(record, "heldout_formats", where, required=False)
        if "heldout_formats" in record and len(formats) != len(heldout):
            raise DataFormatError(f"{where}: 'heldout_formats' has {len(formats)} entries but 'heldout' has "
                                  f"{len(heldout)}; give one format per held-out prompt")
        with_split += "split" in record
        if not _in_split(record, where, split):
            continue
        known = {"id", "answer", "train", "probe", "heldout"}
        extra = {k: v for k, v in record.items() if k not in known}
        facts.append(Fact(id_, answer, train, probe, heldout, extra))
    if split is not None and not facts and limit != 0:
        raise _nothing_in_split(path, "new_facts.jsonl", split, with_split)
    return facts


def load_known_facts(path: Source = None, split: str | None = None) -> list[KnownFact]:
    """Load facts the base model may know (default ``data/known_facts.jsonl``); ``split`` as in `load_facts`."""
    _check_split(split)
    seen: set[str] = set()
    known, with_split = [], 0
    for where, r in _source(path, "known_facts.jsonl"):
        fact = KnownFact(_unique_id(r, where, seen), _text(r, "prompt", where), _text(r, "answer", where),
                         _texts(r, "aliases", where, required=False))
        with_split += "split" in r
        if _in_split(r, where, split):
            known.append(fact)
    if split is not None and not known:
        raise _nothing_in_split(path, "known_facts.jsonl", split, with_split)
    return known


def _text_records(path: Source, name: str) -> list[dict[str, str]]:
    """The id and text of every record of a text set."""
    seen: set[str] = set()
    return [{"id": _unique_id(r, where, seen), "text": _text(r, "text", where)} for where, r in _source(path, name)]


def _load_texts(path: Source, name: str) -> list[str]:
    """The "text" field of every record of a text set with ids."""
    return [record["text"] for record in _text_records(path, name)]


def load_heldout_text(path: Source = None) -> list[str]:
    """Load the held-out paragraphs for perplexity (default ``data/heldout_text.jsonl``)."""
    return _load_texts(path, "heldout_text.jsonl")


def load_background(path: Source = None) -> list[str]:
    """Load the background passages for slot statistics (default ``data/background.jsonl``)."""
    return _load_texts(path, "background.jsonl")


def _row(item: Fact | KnownFact | dict[str, Any]) -> dict[str, Any]:
    """A loaded item as a flat row: its fields (tuples as lists), then its extra keys."""
    if isinstance(item, dict):
        return item
    row = {f.name: getattr(item, f.name) for f in fields(item) if f.name != "extra"}
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in row.items()}, **getattr(item, "extra", {})}


def _as_dataset(items: Iterable[Fact | KnownFact | dict[str, Any]]) -> datasets.Dataset:
    """Loaded items as a ``datasets.Dataset`` with one column per key of any row (None where a row lacks it)."""
    rows = [_row(item) for item in items]
    keys = dict.fromkeys(k for row in rows for k in row)
    return _datasets().Dataset.from_dict({k: [row.get(k) for row in rows] for k in keys})


def facts_dataset(path: Source = None, limit: int | None = None, split: str | None = None) -> datasets.Dataset:
    """``load_facts`` as a Dataset with columns id, answer, train, probe, heldout and any extra keys."""
    return _as_dataset(load_facts(path, limit, split))


def known_facts_dataset(path: Source = None) -> datasets.Dataset:
    """``load_known_facts`` as a Dataset with columns id, prompt, answer and aliases."""
    return _as_dataset(load_known_facts(path))


TEXT_SETS = {"heldout_text": "heldout_text.jsonl", "background": "background.jsonl"}


def texts_dataset(name: str, path: Source = None) -> datasets.Dataset:
    """The text set ``name`` ("heldout_text" or "background") as a Dataset with columns id and text."""
    if name not in TEXT_SETS:
        raise ValueError(f"unknown text set {name!r}; choose one of {sorted(TEXT_SETS)}")
    return _as_dataset(_text_records(path, TEXT_SETS[name]))
