"""retrofit(): function-preserving, generic over decoder architectures, trainable memory only, and safe to
save/load."""

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from smf_lib.memory import ProductKeyMemory
from smf_lib.models import load_base_model
from smf_lib.retrofit import (
    MemoryConfig,
    RetrofitError,
    decoder_layers,
    load_memory,
    memory_config,
    memory_layers,
    retrofit,
    save_memory,
)

SMALL = dict(n_keys=16, heads=2, topk=4, key_dim=16)  # small memories keep the tests fast


def tiny():
    return load_base_model("tiny")[0]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=500, n_positions=64)).eval()


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 6) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=500, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def token_batch(vocab: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 12), generator=generator)


def max_logit_diff(model, build) -> float:
    ids = token_batch(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids).logits
        build(model)
        after = model(ids).logits
    return (before - after).abs().max().item()


@pytest.mark.parametrize("make_model", [tiny, tiny_gpt2, tiny_llama], ids=["tiny-qwen2", "gpt2", "llama"])
def test_retrofit_preserves_logits(make_model):
    model = make_model()
    assert max_logit_diff(model, lambda m: retrofit(m, MemoryConfig())) <= 1e-5
    n_blocks = len(decoder_layers(model))
    layers = memory_layers(model)
    assert [m.layer_index for m in layers] == MemoryConfig().resolved_layers(n_blocks)
    assert all(isinstance(m, ProductKeyMemory) for m in layers)


def test_generic_decoder_discovery():
    assert len(decoder_layers(tiny_gpt2())) == 4
    assert decoder_layers(tiny_gpt2()) is not None
    llama = tiny_llama(layers=6)
    assert decoder_layers(llama) is llama.model.layers
    gpt2 = tiny_gpt2()
    assert decoder_layers(gpt2) is gpt2.transformer.h
    with pytest.raises(RetrofitError, match="Cannot find decoder blocks"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_default_layers_sit_in_the_upper_blocks():
    assert MemoryConfig().resolved_layers(30) == [22, 27]
    assert MemoryConfig().resolved_layers(24) == [18, 21]
    assert MemoryConfig().resolved_layers(4) == [3]  # both fractions fall in the last block
    assert MemoryConfig(layers=(5, 1)).resolved_layers(8) == [1, 5]


def test_config_round_trips_through_a_dict():
    config = MemoryConfig(layers=(1, 3), n_keys=16, mode="replace")
    assert MemoryConfig.from_dict(json.loads(json.dumps(asdict(config)))) == config
    with pytest.raises(RetrofitError, match="Unknown MemoryConfig fields"):
        MemoryConfig.from_dict({"slots": 5})


def test_base_frozen_memory_trainable_and_gradient_reaches_values_only():
    model = retrofit(tiny(), MemoryConfig(**SMALL))
    memory_params = {id(p) for m in memory_layers(model) for p in m.parameters()}
    base_params = [p for p in model.parameters() if id(p) not in memory_params]
    assert base_params and not any(p.requires_grad for p in base_params)
    assert all(p.requires_grad for m in memory_layers(model) for p in m.parameters())
    ids = token_batch(model.config.vocab_size)
    model(ids, labels=ids).loss.backward()
    for m in memory_layers(model):
        assert m.values.weight.grad is not None and torch.count_nonzero(m.values.weight.grad) > 0
    assert all(p.grad is None for p in base_params)


def test_bad_requests_raise():
    model = retrofit(tiny(), MemoryConfig(**SMALL))
    with pytest.raises(RetrofitError, match="already has memory layers"):
        retrofit(model, MemoryConfig(**SMALL))
    with pytest.raises(RetrofitError, match="invalid"):
        retrofit(tiny(), MemoryConfig(layers=(1, 4), **SMALL))  # the tiny model has 4 blocks: 0..3
    with pytest.raises(RetrofitError, match="invalid"):
        retrofit(tiny(), MemoryConfig(layers=(-1,), **SMALL))
    with pytest.raises(RetrofitError, match="mode must be one of"):
        retrofit(tiny(), MemoryConfig(mode="beside", **SMALL))
    with pytest.raises(RetrofitError, match="no memory layers"):
        memory_config(tiny())


def test_replace_mode_changes_the_function():
    model = tiny()
    diff = max_logit_diff(model, lambda m: retrofit(m, MemoryConfig(mode="replace", layers=(2,), **SMALL)))
    assert diff > 1e-3
    assert decoder_layers(model)[2].mlp.mlp is None


def trained_memory_file(tmp_path):
    """A retrofitted tiny model whose memory parameters are all non-trivial, saved to a file."""
    model = retrofit(tiny(), MemoryConfig(layers=(1, 3), seed=0, **SMALL))
    torch.manual_seed(123)
    with torch.no_grad():
        for m in memory_layers(model):
            for p in m.parameters():
                p.add_(torch.randn_like(p))
    return model, save_memory(model, tmp_path / "memory.safetensors")


def memory_tensors(model) -> dict[str, torch.Tensor]:
    return {f"{m.layer_index}.{n}": p.detach().clone() for m in memory_layers(model) for n, p in m.named_parameters()}


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, path = trained_memory_file(tmp_path)
    want = memory_tensors(model)

    other = retrofit(tiny(), MemoryConfig(layers=(1, 3), seed=7, **SMALL))
    assert any(not torch.equal(want[k], v) for k, v in memory_tensors(other).items()), "different seed, different init"
    load_memory(other, path)
    got = memory_tensors(other)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)

    fresh = load_memory(tiny(), path)  # not retrofitted: load_memory retrofits it with the saved config
    assert memory_config(fresh).layers == (1, 3) and memory_config(fresh).n_keys == SMALL["n_keys"]
    got = memory_tensors(fresh)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ids = token_batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_save_is_atomic(tmp_path):
    _, path = trained_memory_file(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.safetensors"]
    save_memory(load_memory(tiny(), path), path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.safetensors"]


def test_load_into_mismatched_model_raises(tmp_path):
    _, path = trained_memory_file(tmp_path)
    with pytest.raises(RetrofitError, match="holds memory for"):
        load_memory(tiny_gpt2(), path)  # another architecture
    with pytest.raises(RetrofitError, match="holds memory for"):
        load_memory(tiny_llama(hidden=32), path)  # another hidden size
    with pytest.raises(RetrofitError, match="holds memory shaped"):
        load_memory(retrofit(tiny(), MemoryConfig(layers=(1, 3), **{**SMALL, "n_keys": 24})), path)
    with pytest.raises(RetrofitError, match="holds memory shaped"):
        load_memory(retrofit(tiny(), MemoryConfig(layers=(0, 3), **SMALL)), path)

    llama_path = save_memory(retrofit(tiny_llama(hidden=64), MemoryConfig(**SMALL)), tmp_path / "llama.safetensors")
    with pytest.raises(RetrofitError, match="holds memory for"):
        load_memory(tiny_llama(hidden=32), llama_path)


def test_corrupt_or_foreign_files_raise(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 this is not a safetensors file")
    with pytest.raises(RetrofitError, match="not a memory file"):
        load_memory(tiny(), corrupt)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))  # valid safetensors, but no memory metadata
    with pytest.raises(RetrofitError, match="not a memory file"):
        load_memory(tiny(), foreign)

    _, path = trained_memory_file(tmp_path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RetrofitError):
        load_memory(tiny(), truncated)

    with pytest.raises(FileNotFoundError):
        load_memory(tiny(), tmp_path / "missing.safetensors")
