"""Sparse training, and scoring a sparsely trained model, start at the first memory block.

Sparse memory finetuning trains nothing below the lowest memory layer (nor does finetuning the memory blocks' MLPs
alone), so the hidden states that enter its block depend on the text alone. They are computed once per training
sentence (`block_inputs`) and every training step runs only the blocks from there up (`forward_logits`): the same
logits at every real token, without the forward pass through the lower blocks (`python -m smf_lib bench` measures
the step's time both ways). Held-out text is scored the same way (`evaluation.heldout_scores`, `same_below`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

import torch

from .batches import Example, collate
from .retrofit import decoder_layers, memory_layers
from .stats import decoder_body


def first_memory_block(model: torch.nn.Module) -> int:
    """Index of the lowest decoder block that holds a memory layer."""
    layers = memory_layers(model)
    if not layers:
        raise ValueError("The model has no memory layer: retrofit it first (smf_lib.retrofit).")
    return min(m.layer_index for m in layers)


@contextmanager
def starting_at(model: torch.nn.Module, block: int) -> Iterator[None]:
    """Within the block, the model's decoder runs its blocks from `block` up; `inputs_embeds` stand for the hidden
    states that enter that block."""
    layers = decoder_layers(model)
    kept = list(layers)
    del layers[:block]
    try:
        yield
    finally:
        del layers[:]
        layers.extend(kept)


class _Reached(Exception):
    """Raised at the block whose inputs were wanted: nothing from there on needs to run."""


@torch.no_grad()
def entering(model: torch.nn.Module, block: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """The hidden states entering decoder block `block` for one right-padded batch, under autocast to `dtype`
    (None: none); neither that block nor any above it runs (a memory block's reads would be counted)."""
    captured: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Reached

    hook = decoder_layers(model)[block].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype is not None), suppress(_Reached):
            decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        hook.remove()
    return captured[0]


@torch.no_grad()
def block_inputs(model: torch.nn.Module, examples: Sequence[Example], block: int, pad_id: int,
                 dtype: torch.dtype | None = None, batch_size: int = 32) -> list[torch.Tensor]:
    """The hidden states entering decoder block `block` at each example's tokens, one (tokens, hidden) tensor per
    example, computed under autocast to `dtype` (None: none) as training's forward is.

    Batches are right-padded: under the causal mask a real token never sees the padding after it, so its states
    do not depend on which sentences share its batch."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate(chunk, pad_id, device)
        hidden = entering(model, block, batch["input_ids"], batch["attention_mask"], dtype)
        out += [hidden[row, : len(e.input_ids)] for row, e in enumerate(chunk)]
    return out


def same_below(model: torch.nn.Module, reference: torch.nn.Module, block: int) -> bool:
    """Whether everything that feeds decoder block `block` (the input embeddings and the blocks below) is
    `reference`'s, bit for bit: then hidden states computed there on `reference` hold for `model` too."""
    def below(m: torch.nn.Module) -> list[torch.Tensor]:
        return [m.get_input_embeddings().weight, *(p for b in decoder_layers(m)[:block] for p in b.parameters())]

    mine, theirs = below(model), below(reference)
    return len(mine) == len(theirs) and all(a.shape == b.shape and a.device == b.device and torch.equal(a, b)
                                            for a, b in zip(mine, theirs))


def forward_logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The model's logits for a batch's `inputs`: token ids, or the hidden states entering the first memory block
    (`"hidden"`, see `Batches`; only the blocks from there up run), with an attention mask or with positions
    (`packing.pack`)."""
    kwargs = {key: inputs[key] for key in ("attention_mask", "position_ids") if key in inputs}
    if "hidden" not in inputs:
        return model(input_ids=inputs["input_ids"], use_cache=False, **kwargs).logits
    inner = getattr(model, "module", model)  # DDP keeps the model in .module
    with starting_at(inner, first_memory_block(inner)):
        return model(inputs_embeds=inputs["hidden"], use_cache=False, **kwargs).logits
