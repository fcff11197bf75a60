"""Insert product-key memory layers into the decoder blocks of a pretrained causal LM."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .files import save_tensors
from .memory import ProductKeyMemory

MODES = ("additive", "replace")
KEY_INITS = ("random", "kmeans")
DEFAULT_DEPTHS = (0.75, 0.9)  # where memory layers go by default, as fractions of the model's depth


class RetrofitError(ValueError):
    """A retrofit request or memory file that does not fit the model."""


@dataclass
class MemoryConfig:
    """Where and how large the memory layers are; the defaults are the best configuration measured so far.

    `layers=None` puts two layers at 3/4 and 9/10 of the depth (blocks 22 and 27 of SmolLM2-135M's 30): lower
    blocks forgot more and learned less (docs/RESULTS.md, layer attribution). 65,536 slots per layer: with 16,384,
    100 facts rewrote about half of all value rows. `mode="additive"` adds the memory beside the MLP
    (function-preserving); `mode="replace"` swaps the MLP out, as Lin et al. (arXiv 2510.15103) and the original
    retrofit do, which breaks the model until the memory is healed.
    Query/key normalisation makes the top-k scores cosine sums, independent of the model's activation scale;
    `temperature` then sets how sharp the softmax over them is and `output_scale` starts the learnable output gain;
    both decide how fast values learn (notebook 03). At 0.05 a head spreads its weight over more of its top-k
    slots than at 0.01, so a new wording of a trained question reads more of the rows training wrote: on the
    tune split held-out recall rose from 0.08 to 0.31 at the same forgetting (docs/RESULTS.md, 2026-12-02).
    """

    layers: tuple[int, ...] | None = None
    n_keys: int = 256
    heads: int = 4
    topk: int = 32
    key_dim: int = 256
    temperature: float = 0.05
    qk_norm: bool = True
    output_scale: float = 20.0
    mode: str = "additive"
    key_init: str = "random"     # "kmeans": sub-keys at centroids of the background's queries (calibrate_keys)
    fit_gates: int = 0           # steps of gates.fit_gates on practice facts after calibration (0: random gates)
    query_rank: int = 0          # r > 0: queries from the r directions that tell practice facts apart (forgot more)
    seed: int = 0

    @classmethod
    def from_dict(cls, fields: dict) -> MemoryConfig:
        """A config from `asdict(config)` or its JSON form (lists become tuples)."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise RetrofitError(f"Unknown MemoryConfig fields {sorted(unknown)}.")
        layers = fields.get("layers")
        return cls(**{**fields, "layers": None if layers is None else tuple(layers)})

    def resolved_layers(self, n_layers: int) -> list[int]:
        """The layer indices, defaulting to 3/4 and 9/10 of `n_layers`."""
        default = sorted({min(int(n_layers * f), n_layers - 1) for f in DEFAULT_DEPTHS})
        layers = list(self.layers) if self.layers is not None else default
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise RetrofitError(f"Memory layers {layers} are invalid: give distinct indices in 0..{n_layers - 1}.")
        return sorted(layers)

    def build(self, dim: int) -> ProductKeyMemory:
        """One memory layer of this configuration for a model of hidden size `dim`."""
        return ProductKeyMemory(dim, self.n_keys, self.heads, self.topk, self.key_dim, temperature=self.temperature,
                                qk_norm=self.qk_norm, output_scale=self.output_scale)


class MemoryMLP(nn.Module):
    """A decoder block's MLP with a memory beside it (`additive`) or in its place (`replace`)."""

    def __init__(self, mlp: nn.Module, memory: ProductKeyMemory, mode: str, layer_index: int) -> None:
        super().__init__()
        self.mlp = mlp if mode == "additive" else None
        self.replaced_mlp = [mlp] if mode == "replace" else []  # kept outside the state dict, for undoing
        self.memory, self.mode, self.layer_index = memory, mode, layer_index

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`mlp(x) + memory(x)` in additive mode, `memory(x)` in replace mode."""
        out = self.memory(x)
        return out if self.mlp is None else self.mlp(x, *args, **kwargs) + out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks: the longest ModuleList whose blocks each have an `mlp`."""
    candidates = [m for m in model.modules()
                  if isinstance(m, nn.ModuleList) and len(m) and all(hasattr(b, "mlp") for b in m)]
    if not candidates:
        raise RetrofitError(f"Cannot find decoder blocks with an `mlp` in {type(model).__name__}; "
                            "this architecture is not supported.")
    return max(candidates, key=len)


def memory_layers(model: nn.Module) -> list[ProductKeyMemory]:
    """The model's memory layers, in depth order (each knows its `layer_index`)."""
    return [m.memory for m in model.modules() if isinstance(m, MemoryMLP)]


def memory_config(model: nn.Module) -> MemoryConfig:
    """The MemoryConfig a retrofitted model was built with."""
    if not hasattr(model, "smf_memory_config"):
        raise RetrofitError("This model has no memory layers; call retrofit(model, MemoryConfig()) first.")
    return model.smf_memory_config


def retrofit(model: nn.Module, config: MemoryConfig | None = None) -> nn.Module:
    """Add memory layers to `model` in place; freeze the base, leave the memory trainable; return the model.

    Example:
        >>> model, tokenizer = load_base_model("smollm2-135m")
        >>> retrofit(model, MemoryConfig(layers=(22, 27)))  # logits unchanged: the values start at zero
        >>> [m.layer_index for m in memory_layers(model)]
        [22, 27]
    """
    config = config or MemoryConfig()
    if memory_layers(model):
        raise RetrofitError("This model already has memory layers; retrofit a fresh copy of the base model instead.")
    if config.mode not in MODES:
        raise RetrofitError(f"mode must be one of {MODES}, got {config.mode!r}.")
    centroids_apply = config.qk_norm and config.mode == "additive"  # unit directions; healing retrains replace keys
    if config.key_init not in KEY_INITS or (config.key_init == "kmeans" and not centroids_apply):
        raise RetrofitError(f"key_init must be one of {KEY_INITS}, got {config.key_init!r}; 'kmeans' needs "
                            "qk_norm=True and mode='additive' (healing trains a replace-mode memory's keys).")
    if config.fit_gates < 0 or (config.fit_gates and config.mode == "replace"):
        raise RetrofitError(f"fit_gates is a number of steps >= 0, got {config.fit_gates}, and for additive mode "
                            "only: a healed memory's gates carry the replaced MLPs' work.")
    if config.query_rank < 0 or (config.query_rank and config.mode == "replace"):
        raise RetrofitError(f"query_rank is a number of directions >= 0, got {config.query_rank}, and for additive "
                            "mode only: a replace-mode memory's queries are trained by healing.")
    blocks = decoder_layers(model)
    layers = config.resolved_layers(len(blocks))
    dim = model.get_input_embeddings().embedding_dim
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for p in model.parameters():
        p.requires_grad_(False)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        for i in layers:
            memory = config.build(dim).to(device=device, dtype=dtype)
            memory.layer_index = i
            blocks[i].mlp = MemoryMLP(blocks[i].mlp, memory, config.mode, i)
    finally:
        torch.random.set_rng_state(generator_state)
    model.smf_memory_config = MemoryConfig(**{**asdict(config), "layers": tuple(layers)})
    return model


def memory_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The memory parameters only, keyed `layers.<index>.<name>`."""
    return {
        f"layers.{m.layer_index}.{name}": p.detach().contiguous()
        for m in memory_layers(model) for name, p in m.named_parameters()
    }


def _model_signature(model: nn.Module) -> dict:
    return {"model_type": getattr(model.config, "model_type", type(model).__name__),
            "hidden_size": model.get_input_embeddings().embedding_dim, "n_layers": len(decoder_layers(model))}


def save_memory(model: nn.Module, path: str | Path) -> Path:
    """Write the memory parameters and their config to a safetensors file, atomically."""
    path = Path(path)
    metadata = {"memory_config": json.dumps(asdict(memory_config(model))),
                "model": json.dumps(_model_signature(model))}
    return save_tensors(memory_state(model), path, metadata)


def load_memory(model: nn.Module, path: str | Path) -> nn.Module:
    """Load memory saved by `save_memory`; a model without memory is retrofitted with the saved config first.

    Example:
        >>> save_memory(trained, "facts.safetensors")                   # a few hundred MB of memory, not the model
        >>> model, tokenizer = load_base_model("smollm2-135m")
        >>> model = load_memory(model, "facts.safetensors")             # retrofitted and filled: knows the facts
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No memory file at {path}.")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        saved_config = MemoryConfig.from_dict(json.loads(metadata["memory_config"]))
        saved_model = json.loads(metadata["model"])
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise RetrofitError(f"{path} is not a memory file written by save_memory ({error}).") from None
    if saved_model != _model_signature(model):
        raise RetrofitError(f"{path} holds memory for {saved_model}, but this model is {_model_signature(model)}.")
    if memory_layers(model):
        current = {k: v for k, v in asdict(memory_config(model)).items() if k != "seed"}
        wanted = {k: v for k, v in asdict(saved_config).items() if k != "seed"}
        if current != wanted:
            raise RetrofitError(f"{path} holds memory shaped {wanted}, but this model's memory is {current}.")
        target = model
    else:
        target = retrofit(copy.deepcopy(model), saved_config)  # checked on a copy: a bad file leaves `model` as it was
    tensors = load_file(str(path))
    expected = {k: v.shape for k, v in memory_state(target).items()}
    if {k: v.shape for k, v in tensors.items()} != expected:
        raise RetrofitError(f"{path} does not hold the tensors its config describes; it is damaged or was not "
                            "written by save_memory.")
    if target is not model:
        retrofit(model, saved_config)
    with torch.no_grad():
        for m in memory_layers(model):
            for name, p in m.named_parameters():
                p.copy_(tensors[f"layers.{m.layer_index}.{name}"])
    return model
