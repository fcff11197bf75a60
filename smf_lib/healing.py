"""Healing, the seed paper's second stage: train a replace-mode memory to stand in for the MLPs it replaced.

A `mode="replace"` retrofit deletes the MLPs of the memory blocks, and the model breaks. Goyal et al. (arXiv
2604.05248) heal by training the memory on ~10-20k general samples with the language-model loss. We distil
instead: the replaced MLP is still at hand, so each memory layer learns to output what its MLP output on the same
input, on generic text. The target is a whole vector per token rather than one next-token label, so far less
text suffices, and each layer trains alone on captured inputs, without running the model again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .calibration import calibrate_queries
from .memory import ProductKeyMemory
from .models import pad_id
from .retrofit import MemoryMLP, memory_config, memory_layers
from .stats import LayerInputs, layer_inputs


@dataclass(frozen=True)
class HealConfig:
    """How long and how fast each memory layer is distilled (defaults measured on the cpu profile, docs/RESULTS.md).

    `lr` is Adam's rate for the query, keys, gate, projection and output scale, `value_lr` its rate for the value
    rows. Both warm up for `warmup` steps, then decay on a cosine. `holdout`: the share of texts (the last ones) kept
    out of training to measure the fit. `written` adds up to that many passages the base model writes itself
    (`written_tokens` each, continuing the opening words of the given texts): more of the text the model meets.
    """

    steps: int = 1000
    batch_tokens: int = 1024
    lr: float = 1e-3
    value_lr: float = 1e-2
    warmup: int = 50
    holdout: float = 0.05
    written: int = 600
    written_tokens: int = 96
    seed: int = 0


@dataclass
class HealResult:
    """What healing did: per layer, the relative squared error `|memory(x) - mlp(x)|² / |mlp(x)|²` on tokens of
    held-back texts before and after, and the tokens, steps and seconds it took."""

    error_before: dict[int, float]
    error_after: dict[int, float]
    tokens: int
    steps: int
    seconds: float

    def as_dict(self) -> dict:
        """A JSON-ready dict (layer indices as strings)."""
        return {k: ({str(i): e for i, e in v.items()} if isinstance(v, dict) else v) for k, v in asdict(self).items()}


@contextmanager
def _mlps_restored(model: torch.nn.Module):
    """Put each replaced MLP back beside its (still silent) memory: while every value row is zero the model is the
    base model again, and its memory layers see the inputs the base model gives them."""
    wrappers = [w for w in model.modules() if isinstance(w, MemoryMLP)]
    for w in wrappers:
        w.mlp = w.replaced_mlp[0]
    try:
        yield
    finally:
        for w in wrappers:
            w.mlp = None


def _check(model: torch.nn.Module) -> list[ProductKeyMemory]:
    if memory_config(model).mode != "replace":
        raise ValueError("heal() is for memory that replaced the MLPs (MemoryConfig(mode='replace')); an additive "
                         "retrofit keeps the MLPs and starts silent, so there is nothing to heal.")
    layers = memory_layers(model)
    if any(m.values.weight.any() for m in layers):
        raise ValueError("heal() starts from a fresh retrofit (all value rows zero); this memory has been trained. "
                         "Retrofit a fresh copy of the base model with mode='replace' and heal that.")
    return layers


def heal(model: torch.nn.Module, tokenizer, texts: Sequence[str], config: HealConfig | None = None,
         progress: bool = True) -> HealResult:
    """Distil each replaced MLP into the memory that replaced it, on generic `texts`; the base stays frozen.

    The queries are first calibrated on the base model's inputs to each layer (`calibrate_queries`); then every
    memory parameter (query, keys, values, gate, projection, scale) is trained to minimise
    `|memory(x) - mlp(x)|² / |mlp(x)|²` over the tokens of `texts`. Never pass the facts to be learned or the
    text that forgetting is measured on.

    Example:
        >>> model, tokenizer = load_base_model("smollm2-135m")
        >>> retrofit(model, MemoryConfig(mode="replace"))      # broken: two MLPs are gone
        >>> heal(model, tokenizer, load_background())           # the memory now does their work
    """
    config = config or HealConfig()
    layers = _check(model)
    if len(texts) < 2:
        raise ValueError(f"heal() needs at least 2 texts (some are held back to measure the fit), got {len(texts)}.")
    started = time.perf_counter()
    with _mlps_restored(model):
        texts = [*write_texts(model, tokenizer, texts[: config.written], config.written_tokens, config.seed), *texts]
        inputs = layer_inputs(model, tokenizer, texts, progress=progress)
    calibrate_queries(model, tokenizer, texts, seed=config.seed, inputs=inputs)
    held_back = _held_back(inputs, config.holdout)
    generator = torch.Generator().manual_seed(config.seed)
    mlps = {w.layer_index: w.replaced_mlp[0] for w in model.modules() if isinstance(w, MemoryMLP)}
    before, after = {}, {}
    for m in layers:
        x = inputs.x[m.layer_index]
        with torch.no_grad():
            y = torch.cat([mlps[m.layer_index](chunk) for chunk in x.split(4096)])
        before[m.layer_index] = _error(m, x[held_back], y[held_back])
        _fit(m, x[~held_back], y[~held_back], config, generator, progress)
        after[m.layer_index] = _error(m, x[held_back], y[held_back])
    return HealResult(before, after, len(inputs.text), config.steps, time.perf_counter() - started)


@torch.no_grad()
def write_texts(model: torch.nn.Module, tokenizer, openings: Sequence[str], new_tokens: int = 96, seed: int = 0,
                batch_size: int = 32, words: int = 6) -> list[str]:
    """Passages the model writes itself: each continues the first `words` words of a text by `new_tokens`
    sampled tokens (temperature 1, nucleus 0.95)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    prompts = [" ".join(t.split()[:words]) for t in openings]
    written = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
                ids = model.generate(**batch.to(model.device), max_new_tokens=new_tokens, do_sample=True,
                                     top_p=0.95, pad_token_id=pad_id(tokenizer))
                written += tokenizer.batch_decode(ids, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return written


def _held_back(inputs: LayerInputs, share: float) -> torch.Tensor:
    """A mask over tokens: those of the last `share` of the texts (at least one text), kept out of training."""
    first = inputs.n_texts - max(1, round(share * inputs.n_texts))
    return inputs.text >= first


@torch.no_grad()
def _error(memory: ProductKeyMemory, x: torch.Tensor, y: torch.Tensor) -> float:
    out = torch.cat([memory(chunk) for chunk in x.split(4096)])
    return float((out - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-12))


def _fit(memory: ProductKeyMemory, x: torch.Tensor, y: torch.Tensor, config: HealConfig,
         generator: torch.Generator, progress: bool) -> None:
    """Train one memory layer on (input, MLP output) pairs, `config.batch_tokens` random tokens per step."""
    dense = [p for name, p in memory.named_parameters() if name != "values.weight"]
    optimizers = [torch.optim.Adam(dense, lr=config.lr),
                  torch.optim.Adam([memory.values.weight], lr=config.value_lr)]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: _schedule(step, config)) for o in optimizers]
    try:
        with torch.enable_grad():
            for _ in tqdm(range(config.steps), desc=f"healing block {memory.layer_index}", disable=not progress):
                batch = torch.randint(len(x), (config.batch_tokens,), generator=generator).to(x.device)
                target = y[batch]
                loss = (memory(x[batch]) - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o, s in zip(optimizers, schedules):
                    o.step()
                    s.step()
    finally:
        memory.zero_grad(set_to_none=True)


def _schedule(step: int, config: HealConfig) -> float:
    """Linear warm-up, then cosine decay to zero: the factor on the base learning rate at `step`."""
    warm = min(1.0, (step + 1) / max(config.warmup, 1))
    return warm * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps))
