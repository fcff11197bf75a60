"""Loading the bundled data sets: new facts to teach, known facts, held-out text, background text.

All files are JSON Lines (one JSON object per line, blank lines skipped). A malformed line raises
``DataFormatError`` with the file, the 1-based line number, what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

DATA_DIR = Path(os.environ.get("SMF_DATA_DIR", Path(__file__).resolve().parent.parent / "data"))


class DataFormatError(ValueError):
    """A line of a data file does not follow the expected format."""


@dataclass(frozen=True)
class Fact:
    """A new fact to teach: training sentences, a probe prompt and held-out question prompts."""

    id: str
    answer: str
    train: tuple[str, ...]
    probe: str
    heldout: tuple[str, ...]
    extra: dict = field(default_factory=dict)


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
    """The non-empty list of non-empty strings under ``key``, or a DataFormatError."""
    if key not in record and not required:
        return ()
    if key not in record:
        raise DataFormatError(f"{where}: missing key {key!r}; add a list of strings")
    value = record[key]
    if (not isinstance(value, list) or (required and not value)
            or not all(isinstance(v, str) and v.strip() for v in value)):
        raise DataFormatError(f"{where}: {key!r} must be a non-empty list of non-empty strings, "
                              f"got {value!r}")
    return tuple(value)


def _unique_id(record: dict, where: str, seen: set[str]) -> str:
    """The record's id, checked to be new."""
    id_ = _text(record, "id", where)
    if id_ in seen:
        raise DataFormatError(f"{where}: duplicate id {id_!r}; every line needs its own id")
    seen.add(id_)
    return id_


def _resolve(path: str | Path | None, name: str) -> Path:
    """The given path, or the bundled file of that name."""
    return Path(path) if path is not None else DATA_DIR / name


def load_facts(path: str | Path | None = None, limit: int | None = None) -> list[Fact]:
    """Load new facts (default ``data/new_facts.jsonl``), optionally only the first ``limit``."""
    path = _resolve(path, "new_facts.jsonl")
    facts: list[Fact] = []
    seen: set[str] = set()
    for where, record in _records(path):
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
        known = {"id", "answer", "train", "probe", "heldout"}
        extra = {k: v for k, v in record.items() if k not in known}
        facts.append(Fact(id_, answer, train, probe, heldout, extra))
    return facts


def load_known_facts(path: str | Path | None = None) -> list[KnownFact]:
    """Load facts the base model may know (default ``data/known_facts.jsonl``)."""
    path = _resolve(path, "known_facts.jsonl")
    seen: set[str] = set()
    return [KnownFact(_unique_id(r, where, seen), _text(r, "prompt", where),
                      _text(r, "answer", where), _texts(r, "aliases", where, required=False))
            for where, r in _records(path)]


def _load_texts(path: Path) -> list[str]:
    """The "text" field of every line of a text file with ids."""
    seen: set[str] = set()
    texts = []
    for where, record in _records(path):
        _unique_id(record, where, seen)
        texts.append(_text(record, "text", where))
    return texts


def load_heldout_text(path: str | Path | None = None) -> list[str]:
    """Load the held-out paragraphs for perplexity (default ``data/heldout_text.jsonl``)."""
    return _load_texts(_resolve(path, "heldout_text.jsonl"))


def load_background(path: str | Path | None = None) -> list[str]:
    """Load the background passages for slot statistics (default ``data/background.jsonl``)."""
    return _load_texts(_resolve(path, "background.jsonl"))
