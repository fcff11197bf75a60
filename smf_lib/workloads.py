"""What the bench trains on and how it measures peak memory: batches of real background text, and short training
runs, one fresh child process per method (a process's peak memory never goes down), for the bench's SMF-against-full-
finetuning figure and for the gpu profile's budget on a randomly initialised stand-in of its model.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .data import Fact, load_background, load_heldout_text
from .evaluation import score_texts
from .models import QWEN_STANDIN, load_base_model
from .pipeline import prepare_memory
from .profiles import Profile, get_profile
from .retrofit import MemoryConfig, load_memory, retrofit, save_memory
from .stats import SlotStats
from .timing import peak_memory_mb
from .training import SPARSE_METHODS, TrainConfig, train

BATCH, SEQ_LEN = 8, 64
MEMORY_STEPS = 2        # the second step holds weights, gradients, optimizer state and activations at once
T4_MB = 15 * 1024       # a Colab T4's memory
BUDGET_METHODS = ("smf_kl", "full_ft", "lora")


# ---------------------------------------------------------------- inputs

def _chunks(tokenizer, texts: Sequence[str], n: int, seq_len: int) -> list[list[str]]:
    """`n` runs of consecutive background passages, each at least `seq_len` tokens when joined with spaces."""
    chunks, current, length = [], [], 0
    for text in texts:
        current.append(text)
        length += len(tokenizer(text)["input_ids"]) + 1
        if length >= seq_len + 4:
            chunks.append(current)
            current, length = [], 0
            if len(chunks) == n:
                return chunks
    raise ValueError(f"Not enough background text for {n} passages of {seq_len} tokens.")


def text_batch(tokenizer, texts: Sequence[str], device: torch.device, batch: int = BATCH,
               seq_len: int = SEQ_LEN) -> dict[str, torch.Tensor]:
    """A (batch, seq_len) batch of real text with no padding."""
    enc = tokenizer([" ".join(c) for c in _chunks(tokenizer, texts, batch, seq_len)], return_tensors="pt",
                    truncation=True, max_length=seq_len)
    return {k: v.to(device) for k, v in enc.items()}


def _answer_word(tokenizer, chunk: str, seq_len: int) -> str:
    """The last whole word of the chunk's first `seq_len - 1` tokens that does not occur again later, so that the
    trained "answer" sits near the end of the truncated sequence, as in a fact sentence."""
    offsets = tokenizer(chunk, return_offsets_mapping=True, truncation=True, max_length=seq_len)["offset_mapping"]
    limit = offsets[-2][1]
    for word in reversed(chunk[:limit].split()):
        word = word.strip(".,;:!?\"'()")
        end = chunk.rindex(word) + len(word) if word else 0
        if len(word) >= 3 and word.isalpha() and end <= limit and not chunk[end:end + 1].isalpha():
            return word
    raise ValueError(f"No usable answer word in {chunk[:limit]!r}.")


def long_facts(tokenizer, texts: Sequence[str], n: int = 2 * BATCH, seq_len: int = SEQ_LEN) -> list[Fact]:
    """Facts whose one training sentence is `seq_len`+ tokens of background text and whose "answer" is a word near
    its end: training batches are then (8, seq_len) like the forward batch, not the short sentences of the fact set."""
    facts = []
    for i, passages in enumerate(_chunks(tokenizer, texts, n, seq_len)):
        chunk = " ".join(passages)
        offsets = tokenizer(chunk, return_offsets_mapping=True, truncation=True, max_length=seq_len)["offset_mapping"]
        chunk = chunk[: offsets[-1][1]]  # its first seq_len tokens: training never truncates a sentence
        facts.append(Fact(f"bench{i:03d}", _answer_word(tokenizer, chunk, seq_len), (chunk,), passages[0],
                          (passages[0],)))
    return facts


# ---------------------------------------------------------------- peak memory (child processes)

def _peak_child(spec: str) -> None:
    """Child-process entry: set up the model and memory, train a few steps, print the peak memory as JSON.

    With a `memory` file the parent's calibrated memory and statistics are loaded; without one the child retrofits,
    calibrates and counts itself (a model the parent does not hold). With `evaluate` it also does what `run` does
    around training: a checkpoint's perplexity pass while training's state is alive, then the final scores with
    the KL to the untrained model, which waits outside the GPU meanwhile (here: in a file). `t4` trains in the
    precision a T4 gets
    (`autocast_dtype`): 16-bit activations for the dense methods (bf16 off a GPU, the same size), fp32 for SMF.
    """
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    model, tokenizer = load_base_model(args["model"])
    memory_config = MemoryConfig.from_dict(args["memory_config"])
    if args.get("memory"):  # retrofit first: load_memory then fills the memory in place
        model = load_memory(retrofit(model.to(device), memory_config), args["memory"])
        stats = SlotStats.load(args["stats"]) if args["method"].startswith("smf") else None
    else:
        stats = prepare_memory(model.to(device), tokenizer, load_background()[:16], memory_config, progress=False)
    texts = load_heldout_text()[:8] if args["evaluate"] else []
    if texts:
        untrained = Path(tempfile.mkdtemp()) / "untrained.safetensors"
        save_model(model, str(untrained))
    facts = long_facts(tokenizer, load_background(), n=2 * args["batch"], seq_len=args["seq_len"])
    precision = ("fp32" if args["method"] in SPARSE_METHODS else "bf16") if args["t4"] else "auto"
    config = TrainConfig(method=args["method"], steps=args["steps"], batch_size=args["batch"],
                         max_length=args["seq_len"], precision=precision)
    peaks = {}

    def checkpoint(step: int, trained: torch.nn.Module) -> None:
        if step == config.steps:
            peaks["train_mb"] = peak_memory_mb(device)
            if texts:
                score_texts(trained, tokenizer, texts)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peaks["setup_mb"] = peak_memory_mb(device)
    model, _ = train(model, tokenizer, facts, config, background=stats, callback=checkpoint, progress=False)
    if texts:
        reference = copy.deepcopy(model)
        load_model(reference, str(untrained))
        shutil.rmtree(untrained.parent)
        score_texts(model, tokenizer, texts, reference=reference)
    print(json.dumps({**peaks, "peak_mb": peak_memory_mb(device)}))


def _start_child(args: dict) -> subprocess.Popen:
    """Start `_peak_child` in a fresh interpreter."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = "import sys; from smf_lib.workloads import _peak_child; _peak_child(sys.argv[1])"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=root)


def _child_result(child: subprocess.Popen, method: str) -> dict:
    """Wait for a child and return the JSON it printed last."""
    stdout, stderr = child.communicate()
    if child.returncode:
        raise RuntimeError(f"Peak-memory run for {method} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def _peaks(base: dict, methods: Sequence[str], together: bool) -> dict[str, dict]:
    """Each method's child result; the children run at the same time when `together` (peak RSS is per process)."""
    if not together:
        return {m: _child_result(_start_child({**base, "method": m}), m) for m in methods}
    children = {m: _start_child({**base, "method": m}) for m in methods}
    return {m: _child_result(child, m) for m, child in children.items()}


def _measured_by(device: torch.device) -> str:
    return ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
            "peak resident set size (VmHWM of /proc/self/status, else ru_maxrss)")


def bench_memory(model_name: str, retro: torch.nn.Module, stats: SlotStats, device: torch.device,
                 batch_size: int = BATCH, seq_len: int = SEQ_LEN,
                 methods: Sequence[str] = ("smf_kl", "full_ft")) -> dict:
    """Peak memory of a short training run per method, each in its own child process."""
    with tempfile.TemporaryDirectory() as tmp:
        memory, stats_path = (save_memory(retro, Path(tmp) / "memory.safetensors"),
                              stats.save(Path(tmp) / "stats.safetensors"))
        base = {"model": model_name, "memory": str(memory), "memory_config": asdict(retro.smf_memory_config),
                "stats": str(stats_path), "device": str(device), "threads": torch.get_num_threads(),
                "steps": MEMORY_STEPS, "batch": batch_size, "seq_len": seq_len, "evaluate": False, "t4": False}
        peaks = _peaks(base, methods, together=device.type != "cuda")  # on CUDA they would share the GPU
    smf, full = peaks["smf_kl"], peaks["full_ft"]
    return {"smf_peak_mem_vs_full_ft_ratio": smf["peak_mb"] / full["peak_mb"],
            "smf_peak_mem_increase_vs_full_ft_ratio": (smf["peak_mb"] - smf["setup_mb"]) /
                                                      max(full["peak_mb"] - full["setup_mb"], 1e-9),
            "peak_mem_mb": peaks, "memory_steps": MEMORY_STEPS,
            "memory_measured_by": f"{_measured_by(device)}, one child process per method: model + memory loaded, "
                                  f"then {MEMORY_STEPS} training steps"}


def gpu_profile_peaks(profile: str | Profile = "gpu", model: str = QWEN_STANDIN,
                      methods: Sequence[str] = BUDGET_METHODS, device: torch.device | None = None) -> dict:
    """Peak memory per method of `run` (and of notebook 04's live comparison) at `profile`'s sizes, on `model`.

    By default: the gpu profile on a randomly initialised model of Qwen2.5-0.5B's shape, so that a Colab T4's
    budget is estimated on any machine, offline: off a GPU in the precision a T4 trains in, on one in its own
    precision with the CUDA allocator's peak. Each child trains the profile's batch of SEQ_LEN-token sequences
    (more than twice the longest bundled training sentence, 27 tokens; `max_length` only bounds a user's) for two
    steps, scoring held-out text as a checkpoint does, then once more with the KL to the untrained model, as the
    final scores do. `gpu_profile_peak_mb` is the training's peak; `run_peak_mb` includes the scoring.
    """
    profile = get_profile(profile)
    device = device or torch.device("cpu")
    base = {"model": model, "memory_config": asdict(profile.memory), "device": str(device),
            "threads": torch.get_num_threads(), "steps": MEMORY_STEPS, "batch": profile.train.batch_size,
            "seq_len": SEQ_LEN, "evaluate": True, "t4": device.type != "cuda"}
    peaks = _peaks(base, methods, together=False)  # one at a time: each may need most of the machine's memory
    run_peaks = {m: p["peak_mb"] for m, p in peaks.items()}
    return {"gpu_profile_peak_mb": {m: p["train_mb"] for m, p in peaks.items()},
            "gpu_profile_budget": {"profile": profile.name, "model": model, "batch": [base["batch"], base["seq_len"]],
                                   "run_peak_mb": run_peaks, "t4_mb": T4_MB,
                                   "fits_t4": all(mb < T4_MB for mb in run_peaks.values()),
                                   "measured_by": f"{_measured_by(device)}; {MEMORY_STEPS} training steps in a T4's "
                                                  "precision, held-out text scored at the last step and with the KL "
                                                  "to the untrained model after training"}}
