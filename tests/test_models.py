"""The model registry: clear errors for unknown or unreachable models, a deterministic tiny model, the real
offline model."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from smf_lib.models import KNOWN_MODELS, ModelNotAvailableError, load_base_model
from smf_lib.retrofit import MemoryConfig, retrofit


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelNotAvailableError) as error:
        load_base_model("no-such-model")
    message = str(error.value)
    assert "no-such-model" in message
    for name in KNOWN_MODELS:
        assert name in message


def test_tiny_is_deterministic_under_a_seed():
    a, tokenizer = load_base_model("tiny", seed=0)
    b, _ = load_base_model("tiny", seed=0)
    c, _ = load_base_model("tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training and next(a.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert a.config.vocab_size == len(tokenizer)


def test_tiny_leaves_the_global_random_state_alone():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    load_base_model("tiny", seed=9)
    assert torch.equal(torch.rand(3), want)


# The real offline model. Loading in a child process with HF_HUB_OFFLINE=1 set before transformers is imported
# proves that nothing is fetched from the hub; the same process also shows the hub-only model failing clearly.
OFFLINE_SCRIPT = textwrap.dedent("""
    import json
    from smf_lib.models import ModelNotAvailableError, load_base_model
    model, tokenizer = load_base_model("smollm2-135m")
    report = {"class": type(model).__name__, "layers": model.config.num_hidden_layers,
              "hidden": model.config.hidden_size, "params": sum(p.numel() for p in model.parameters()),
              "vocab": len(tokenizer)}
    try:
        load_base_model("qwen2.5-0.5b")
        report["qwen_error"] = None
    except ModelNotAvailableError as error:
        report["qwen_error"] = str(error)
    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def offline_report():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [s for s in done.stdout.splitlines() if s.startswith("REPORT ")][-1]
    return json.loads(line.removeprefix("REPORT "))


@pytest.mark.slow
def test_smollm2_loads_offline(offline_report):
    assert offline_report["class"] == "LlamaForCausalLM"
    assert offline_report["layers"] == 30 and offline_report["hidden"] == 576
    assert 134_000_000 < offline_report["params"] < 135_000_000
    assert offline_report["vocab"] == 49152


@pytest.mark.slow
def test_hub_model_offline_names_the_cpu_profile(offline_report):
    message = offline_report["qwen_error"]
    assert message is not None, "qwen2.5-0.5b loaded although the hub is offline"
    assert "--profile cpu" in message and "smollm2-135m" in message


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in completion, completion


@pytest.mark.slow
def test_smollm2_retrofit_preserves_logits():
    model, tokenizer = load_base_model("smollm2-135m")
    batch = tokenizer(["The capital of France is Paris.", "Water boils at one hundred degrees Celsius at sea level."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**batch).logits
        retrofit(model, MemoryConfig())
        after = model(**batch).logits
    assert (before - after).abs().max().item() <= 1e-5
