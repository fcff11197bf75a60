"""Measuring learning and forgetting: fact recall, paraphrase recall, held-out perplexity, known facts."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .data import Fact, KnownFact
from .losses import next_token_losses
from .models import pad_id
from .prefix import entering, first_memory_block, forward_logits, same_below
from .retrofit import memory_layers


def _normalise(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def contains_answer(completion: str, answers: Sequence[str]) -> bool:
    """Whether the completion contains any of the answers as whole words, case-insensitively."""
    words = " ".join(_normalise(completion))
    return any(re.search(rf"\b{re.escape(' '.join(_normalise(a)))}\b", words) for a in answers if _normalise(a))


@torch.no_grad()
def complete(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 128) -> list[str]:
    """Greedy completions of `prompts`, batched with left padding, in the order given."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    # Batch prompts of similar length together: less padding to compute.
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    outputs: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id(tokenizer))
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                outputs[i] = text
    finally:
        tokenizer.padding_side = side
    return outputs


def hit_rate(completions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of completions that contain their answer (whole words, case-insensitive)."""
    hits = [contains_answer(c, [a]) for c, a in zip(completions, answers)]
    return sum(hits) / max(len(hits), 1)


def recall(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], max_new_tokens: int = 8) -> float:
    """Share of prompts whose greedy completion contains its answer."""
    return hit_rate(complete(model, tokenizer, prompts, max_new_tokens), answers)


def fact_recall(model, tokenizer, facts: Sequence[Fact]) -> float:
    """Share of new facts whose probe prompt, completed greedily, gives the answer."""
    return recall(model, tokenizer, [f.probe for f in facts], [f.answer for f in facts])


def paraphrase_recall(model, tokenizer, facts: Sequence[Fact]) -> float:
    """Share of held-out question forms (never trained on) answered correctly."""
    prompts = [q for f in facts for q in f.heldout]
    return recall(model, tokenizer, prompts, [f.answer for f in facts for _ in f.heldout])


def known_correct(model, tokenizer, known: Sequence[KnownFact]) -> list[bool]:
    """Which known facts the model answers correctly."""
    return _answered(complete(model, tokenizer, [k.prompt for k in known]), known)


def _answered(completions: Sequence[str], known: Sequence[KnownFact]) -> list[bool]:
    return [contains_answer(c, k.answers()) for c, k in zip(completions, known)]


@dataclass
class TextStates:
    """Hidden states entering decoder block `block`, one tensor per batch of held-out texts (`text_states`)."""

    block: int
    hidden: list[torch.Tensor]
    source: torch.nn.Module  # the model they were computed on


@dataclass
class TextScores:
    """Held-out text, scored per text: summed next-token loss, token count and, against a reference model, summed
    KL divergence KL(p_reference || p_model) over the same tokens."""

    nll: torch.Tensor
    tokens: torch.Tensor
    kl: torch.Tensor | None = None

    @property
    def perplexity(self) -> float:
        """Token-level perplexity over all texts."""
        return math.exp(float(self.nll.sum() / self.tokens.sum().clamp_min(1)))

    @property
    def kl_per_token(self) -> float:
        """Mean per-token KL divergence from the reference model's next-token distribution."""
        return float(self.kl.sum() / self.tokens.sum().clamp_min(1)) if self.kl is not None else float("nan")


def _text_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, device: torch.device):
    """`score_texts`' batches: right-padded (the loss mask assumes it), each text truncated to `max_length`."""
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for start in range(0, len(texts), batch_size):
            yield tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length).to(device)
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def text_states(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 256) -> TextStates:
    """The hidden states entering `model`'s first memory block for each of `score_texts`' batches of `texts`."""
    block = first_memory_block(model)
    device = next(model.parameters()).device
    return TextStates(block, [entering(model, block, b["input_ids"], b["attention_mask"])
                              for b in _text_batches(tokenizer, texts, batch_size, max_length, device)], model)


@torch.no_grad()
def score_texts(model, tokenizer, texts: Sequence[str], reference=None, batch_size: int = 8,
                max_length: int = 256, states: TextStates | None = None) -> TextScores:
    """Score each text on its own (truncated to `max_length` tokens): loss per text, and KL to `reference`.

    With `states` (`text_states` of these texts, on a model whose lower blocks `model` and `reference` share:
    `prefix.same_below`) each forward starts at the first memory block: the same scores without the blocks below.
    """
    if states is not None and states.block != first_memory_block(model):
        raise ValueError(f"The states enter block {states.block}, but this model's first memory block is "
                         f"{first_memory_block(model)}: compute them with text_states on a model like this one.")
    device = next(model.parameters()).device
    nll, tokens, kl = [], [], []
    for i, batch in enumerate(_text_batches(tokenizer, texts, batch_size, max_length, device)):
        inputs = {"attention_mask": batch["attention_mask"],
                  **({"hidden": states.hidden[i]} if states else {"input_ids": batch["input_ids"]})}
        mask = batch["attention_mask"][:, 1:].float()
        logits = forward_logits(model, inputs).float()
        nll.append((next_token_losses(logits, batch["input_ids"])[:, :-1] * mask).sum(1).cpu())
        tokens.append(mask.sum(1).cpu())
        if reference is not None:
            log_p = torch.log_softmax(logits[:, :-1], dim=-1)
            log_ref = torch.log_softmax(forward_logits(reference, inputs)[:, :-1].float(), dim=-1)
            per_token = (log_ref.exp() * (log_ref - log_p)).sum(-1)
            kl.append((per_token * mask).sum(1).cpu())
    return TextScores(torch.cat(nll).double(), torch.cat(tokens).double(),
                      torch.cat(kl).double() if kl else None)


def heldout_scores(model, base, tokenizer, texts: Sequence[str], cache: list[TextStates], kl: bool = False
                   ) -> TextScores:
    """`score_texts` (with `kl`, against `base`), starting at the first memory block when `model` shares `base`'s
    lower blocks, as sparse training leaves them: the states entering it are computed once, kept in `cache`."""
    shared = bool(memory_layers(model)) and same_below(model, base, first_memory_block(model))
    if shared and not (cache and cache[0].source is base):
        cache[:] = [text_states(base, tokenizer, texts)]
    return score_texts(model, tokenizer, texts, reference=base if kl else None, states=cache[0] if shared else None)


@torch.no_grad()
def answer_nll(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Mean next-token loss of each answer after its prompt (`prompt + " " + answer`), one value per pair.

    A graded score of what a model knows: a known fact can weaken well before its greedy answer flips.
    """
    if not prompts:
        return torch.zeros(0)
    device = next(model.parameters()).device
    starts = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    full = [f"{p} {a}" for p, a in zip(prompts, answers)]
    out = []
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for begin in range(0, len(full), batch_size):
            batch = tokenizer(full[begin:begin + batch_size], return_tensors="pt", padding=True).to(device)
            losses = next_token_losses(model(**batch).logits.float(), batch["input_ids"])[:, :-1]
            position = torch.arange(losses.shape[1], device=device)
            start = torch.tensor(starts[begin:begin + batch_size], device=device)[:, None]
            answer = (position >= start - 1) & batch["attention_mask"][:, 1:].bool()
            out.append(((losses * answer).sum(1) / answer.sum(1).clamp_min(1)).cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(out)


def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 256) -> float:
    """Token-level perplexity of `texts` (each scored on its own, truncated to `max_length` tokens)."""
    return score_texts(model, tokenizer, texts, batch_size=batch_size, max_length=max_length).perplexity


def bootstrap_interval(statistic: Callable[[torch.Tensor], float], n: int, samples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(indices)` over `n` items resampled with replacement."""
    generator = torch.Generator().manual_seed(seed)
    values = sorted(statistic(torch.randint(n, (n,), generator=generator)) for _ in range(samples))
    tail = (1 - level) / 2
    return values[int(tail * (samples - 1))], values[int((1 - tail) * (samples - 1))]
