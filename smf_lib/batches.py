"""Training sentences as tensors: tokenised with the masks of their answer and subject, padded into batches, and
the positions at which a batch's slot reads are counted."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .data import Fact
from .losses import predicting
from .stats import tokens_overlapping

COUNT_POSITIONS = ("answer", "subject", "entities", "entity_ends", "both", "all")


@dataclass
class Example:
    """One tokenised training sentence with the masks of its answer tokens and of its subject's tokens; a negative
    one tells the answer of another subject, so it must not be predicted."""

    input_ids: list[int]
    answer_mask: list[bool]
    subject_mask: list[bool] = field(default_factory=list)
    negative: bool = False
    hidden: torch.Tensor | None = None  # the states entering the first trained block, when training reuses them


def build_examples(facts: Sequence[Fact], tokenizer, max_length: int = 256) -> list[Example]:
    """Tokenise every training sentence; mark the tokens that overlap the answer's last occurrence, and those
    that overlap any occurrence of the fact's subject (when the fact names one).

    A sentence is never truncated, which could silently cut its answer off: one longer than `max_length` tokens
    raises a ValueError that names it.
    """
    examples = []
    for fact in facts:
        for sentence in fact.train:
            enc = tokenizer(sentence, return_offsets_mapping=True)
            if len(enc["input_ids"]) > max_length:
                raise ValueError(f"fact {fact.id!r}: the training sentence {sentence[:60]!r}... has "
                                 f"{len(enc['input_ids'])} tokens, more than max_length={max_length}; split it into "
                                 "shorter sentences that each contain the answer, or raise TrainConfig.max_length")
            subject = fact.subject
            spans = [(m.start(), m.end()) for m in re.finditer(re.escape(subject), sentence)] if subject else []
            examples.append(Example(enc["input_ids"], answer_tokens(enc, sentence, fact.answer),
                                    tokens_overlapping(enc["offset_mapping"], spans)))
    return examples


def answer_tokens(enc, sentence: str, answer: str) -> list[bool]:
    """The tokens that overlap the answer's last occurrence in the tokenised sentence."""
    start = sentence.rindex(answer)
    return tokens_overlapping(enc["offset_mapping"], [(start, start + len(answer))])


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a batch: token ids, the attention mask, the masks of answer and subject tokens, which sentences
    are negative and, when every example carries them, the hidden states of its tokens (`"hidden"`), on `device`."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids, dtype=torch.bool)
    answer, subject = torch.zeros_like(attention), torch.zeros_like(attention)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[row, : len(e.input_ids)] = True
        answer[row, : len(e.answer_mask)] = torch.tensor(e.answer_mask)
        subject[row, : len(e.subject_mask)] = torch.tensor(e.subject_mask, dtype=torch.bool)
    negative = torch.tensor([e.negative for e in examples], dtype=torch.bool)
    batch = {"input_ids": ids.to(device), "attention_mask": attention.to(device), "answer": answer.to(device),
             "subject": subject.to(device), "negative": negative.to(device)}
    if all(e.hidden is not None for e in examples):
        batch["hidden"] = torch.nn.utils.rnn.pad_sequence([e.hidden for e in examples], batch_first=True).to(device)
    return batch


def counted_positions(batch: dict[str, torch.Tensor], count_on: str) -> torch.Tensor:
    """The positions whose slot reads are counted: those predicting an answer token, the subject's tokens (where
    factual recall is looked up, Meng et al. 2022, arXiv 2202.05262; a sentence that does not name the subject
    counts at its answer instead), the "entities" (the subject and the answer's own tokens that predict its next
    one, so that no row is keyed on the words before the answer), "entity_ends" (the same with only the last token
    of each mention of the subject, where the whole name has been read), both, or every real token. Negative
    sentences are never counted: their rows are those of other facts."""
    positive = ~negative_rows(batch)
    if count_on == "all":
        return batch["attention_mask"] & positive
    answer, subject = predicting(batch["answer"]), batch["subject"]
    subject = subject | (answer & ~subject.any(dim=1, keepdim=True))  # a sentence without its subject: the answer
    inside = answer & batch["answer"]  # within the answer: "Grathine" predicting "Pomirnard"
    ends = subject & ~predicting(subject)  # a subject token whose next token is not the subject's
    return {"answer": answer, "subject": subject, "entities": subject | inside, "entity_ends": ends | inside,
            "both": answer | subject}[count_on] & positive


def negative_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which rows of the batch are negative sentences, as a (batch, 1) mask (none when the batch does not say)."""
    negative = batch.get("negative")
    if negative is None:
        negative = torch.zeros(len(batch["input_ids"]), dtype=torch.bool, device=batch["input_ids"].device)
    return negative[:, None]
