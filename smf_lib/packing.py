"""A batch's sentences run as one row, without padding.

Training batches are right-padded to their longest sentence, and every weight matrix multiplies the padding as
it does a word: with the bundled facts' training sentences (18 tokens on average, 27 at most) a quarter of a
batch of 16 is padding. Packed, the batch's real tokens run as one row; each token's position within its own
sentence (`position_ids`) marks where sentences start, and the model's attention mask, built from them, keeps
each sentence to itself. Every token then sees what it saw in its padded row and gets the same loss, up to float
rounding (`python -m smf_lib bench` times a full-finetuning step both ways).
"""

from __future__ import annotations

import torch

from .losses import next_token_losses, predicting
from .prefix import forward_logits


def packed(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real tokens' entries of a per-token tensor (batch, seq, ...), as one row (1, tokens, ...)."""
    return values[mask.bool()][None]


def unpacked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values of one packed row (1, tokens) in the padded batch's shape (batch, seq), zero at padding."""
    return values.new_zeros(mask.shape).masked_scatter(mask.bool(), values[0])


def pack(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs of a right-padded batch as one row: its token ids, and the hidden states when it carries
    them (prefix.py), with each token's position within its sentence."""
    mask = batch["attention_mask"].bool()
    inputs = {"input_ids": packed(batch["input_ids"], mask), "position_ids": packed(mask.cumsum(1) - 1, mask)}
    if "hidden" in batch:
        inputs["hidden"] = packed(batch["hidden"], mask)
    return inputs


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], pack_batch: bool = True) -> torch.Tensor:
    """Each position's next-token loss (batch, seq) from one forward pass over the batch, packed or padded.

    Packed, the loss at a sentence's last token is that of the next sentence's first token; padded, it is that
    of a padding token: either way a position that predicts no token of its own sentence, which the caller masks.
    """
    if not pack_batch:
        return next_token_losses(forward_logits(model, batch), batch["input_ids"])
    inputs = pack(batch)
    return unpacked(next_token_losses(forward_logits(model, inputs), inputs["input_ids"]), batch["attention_mask"])


@torch.no_grad()
def packs_exactly(model: torch.nn.Module, batch: dict[str, torch.Tensor], tolerance: float = 1e-3) -> bool:
    """Whether the model gives a batch the same losses packed as padded, which needs an attention mask that
    honours `position_ids` (transformers' Llama, Qwen and most decoders); compared at every trained position."""
    trained = predicting(batch["attention_mask"].bool())  # right padding: a real token precedes every real token
    difference = (token_losses(model, batch) - token_losses(model, batch, False))[trained].abs()
    return bool(difference.max() <= tolerance) if difference.numel() else True
