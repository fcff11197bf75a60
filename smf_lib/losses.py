"""The next-token loss, shared by training and perplexity."""

from __future__ import annotations

import torch


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next token, (batch, seq).

    The targets are shifted rather than the logits, so the (batch*seq, vocab) logits stay contiguous: no copy of the
    largest activation, and a softmax over its last dimension. The last position's target wraps around to the first
    token: mask it out.
    """
    targets = input_ids.roll(-1, dims=1)
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view_as(input_ids)


def predicting(targets: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is marked in `targets` (batch x seq, bool)."""
    out = torch.zeros_like(targets)
    out[:, :-1] = targets[:, 1:]
    return out
