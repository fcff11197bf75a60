"""The performance suite behind `python -m smf_lib bench`: the retrofitted model against its base, one SMF training
step against full finetuning and LoRA, the cost of slot selection, peak memory, and our memory layer against the
`product-key-memory` package's `PKM`.

Everything compared is measured side by side in one process (peak memory: one short child process per method,
since a process's peak RSS never goes down), as medians of repeated runs after warm-up.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .data import Fact, load_background
from .files import write_json
from .models import default_device, load_base_model
from .pipeline import prepare_memory
from .profiles import Profile, get_profile
from .retrofit import MemoryConfig, load_memory, memory_layers, retrofit, save_memory
from .stats import SlotStats
from .timing import interleaved, median, peak_memory_mb
from .training import Batches, TrainConfig, make_optimizer, train, train_step

CONTRACT_KEYS = ("forward_overhead_ratio", "smf_step_vs_full_ft_ratio", "smf_step_vs_lora_ratio",
                 "smf_peak_mem_vs_full_ft_ratio", "selection_overhead_frac", "pkm_vs_reference_ratio")
# Upper bounds the project aims for; the table marks each figure against them.
TARGETS = {"forward_overhead_ratio": 1.10, "smf_step_vs_full_ft_ratio": 0.35, "smf_step_vs_lora_ratio": 0.65,
           "smf_peak_mem_vs_full_ft_ratio": 0.50, "selection_overhead_frac": 0.05, "pkm_vs_reference_ratio": 0.80}
STEP_METHODS = ("smf_kl", "full_ft", "lora")
BATCH, SEQ_LEN, WARMUP = 8, 64, 1
SLOT_SCALING_KEYS = (128, 256, 512)
SEQ_SCALING = (64, 128, 256, 512)
MEMORY_STEPS = 2        # the second step holds weights, gradients, optimizer state and activations at once


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
        facts.append(Fact(f"bench{i:03d}", _answer_word(tokenizer, chunk, seq_len), (chunk,), passages[0],
                          (passages[0],)))
    return facts


# ---------------------------------------------------------------- forward overhead

@torch.no_grad()
def bench_forward(base: torch.nn.Module, retro: torch.nn.Module, batch: dict, repeats: int,
                  device: torch.device) -> dict:
    """Base and retrofitted forward (no grad) on the same batch, interleaved."""
    times = interleaved({"base": lambda: base(**batch), "retrofitted": lambda: retro(**batch)}, repeats, device)
    base_s, retro_s = median(times["base"]), median(times["retrofitted"])
    return {"forward_overhead_ratio": retro_s / base_s, "base_forward_seconds": base_s,
            "retrofitted_forward_seconds": retro_s}


# ---------------------------------------------------------------- training steps

class _Trainer:
    """One method's model, optimizer and batches, stepped by `train_step` exactly as `train()` steps them."""

    def __init__(self, retro: torch.nn.Module, tokenizer, facts: Sequence[Fact], stats: SlotStats, method: str,
                 batch_size: int, seq_len: int) -> None:
        self.config = TrainConfig(method=method, batch_size=batch_size, max_length=seq_len)
        self.accelerator = Accelerator(cpu=default_device().type == "cpu")
        model, self.optimizer, self.params_trained = make_optimizer(copy.deepcopy(retro), self.config, stats)
        self.model = self.accelerator.prepare(model.eval())
        self.batches = Batches(facts, tokenizer, self.config, self.accelerator)

    def step(self) -> float:
        """One training step on the next batch."""
        return train_step(self.model, self.optimizer, self.batches.next(), self.config, self.accelerator)


def bench_steps(retro: torch.nn.Module, tokenizer, facts: Sequence[Fact], stats: SlotStats, repeats: int,
                device: torch.device, batch_size: int = BATCH, seq_len: int = SEQ_LEN,
                methods: Sequence[str] = STEP_METHODS) -> dict:
    """The trainer's step time per method, the methods' steps interleaved; and the share of an SMF step spent
    counting slot reads and choosing the top-t rows (measured inside the same steps by the optimizer)."""
    trainers = {m: _Trainer(retro, tokenizer, facts, stats, m, batch_size, seq_len) for m in methods}
    smf = trainers["smf_kl"].optimizer
    selection: list[float] = []

    def smf_step() -> None:
        trainers["smf_kl"].step()
        selection.append(smf.last_selection_seconds)

    steps = {m: (smf_step if m == "smf_kl" else t.step) for m, t in trainers.items()}
    times = interleaved(steps, repeats, device, warmup=WARMUP)
    seconds = {m: median(times[m]) for m in methods}
    select_s = median(selection[WARMUP:])
    return {"step_seconds": seconds,
            "smf_step_vs_full_ft_ratio": seconds["smf_kl"] / seconds["full_ft"],
            "smf_step_vs_lora_ratio": seconds["smf_kl"] / seconds["lora"],
            "params_trained": {m: t.params_trained for m, t in trainers.items()},
            "selection_overhead_frac": select_s / seconds["smf_kl"], "selection_seconds": select_s,
            "selection_top_t": trainers["smf_kl"].config.top_t}


# ---------------------------------------------------------------- peak memory (child processes)

def _peak_child(spec: str) -> None:
    """Child-process entry: load the model and memory, train a few steps, print the peak memory as JSON."""
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    model, tokenizer = load_base_model(args["model"])
    # Retrofit first: load_memory then fills the memory in place (on a bare model it would check on a full copy).
    model = load_memory(retrofit(model.to(device), MemoryConfig.from_dict(args["memory_config"])), args["memory"])
    stats = SlotStats.load(args["stats"]) if args["method"].startswith("smf") else None
    facts = long_facts(tokenizer, load_background(), seq_len=args["seq_len"])
    config = TrainConfig(method=args["method"], steps=args["steps"], batch_size=args["batch"],
                         max_length=args["seq_len"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_memory_mb(device)
    train(model, tokenizer, facts, config, background=stats, progress=False)
    print(json.dumps({"setup_mb": before, "peak_mb": peak_memory_mb(device)}))


def _start_child(args: dict) -> subprocess.Popen:
    """Start `_peak_child` in a fresh interpreter."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = "import sys; from smf_lib.bench import _peak_child; _peak_child(sys.argv[1])"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=root)


def _child_result(child: subprocess.Popen, method: str) -> dict:
    """Wait for a child and return the JSON it printed last."""
    stdout, stderr = child.communicate()
    if child.returncode:
        raise RuntimeError(f"Peak-memory run for {method} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def bench_memory(model_name: str, retro: torch.nn.Module, stats: SlotStats, device: torch.device,
                 batch_size: int = BATCH, seq_len: int = SEQ_LEN,
                 methods: Sequence[str] = ("smf_kl", "full_ft")) -> dict:
    """Peak memory of a short training run per method, each in its own child process."""
    with tempfile.TemporaryDirectory() as tmp:
        memory, stats_path = (save_memory(retro, Path(tmp) / "memory.safetensors"),
                              stats.save(Path(tmp) / "stats.safetensors"))
        base = {"model": model_name, "memory": str(memory), "memory_config": asdict(retro.smf_memory_config),
                "stats": str(stats_path), "device": str(device),
                "threads": torch.get_num_threads(), "steps": MEMORY_STEPS, "batch": batch_size, "seq_len": seq_len}
        # Peak RSS is per process, so the children may run at the same time (on CUDA they share the GPU: one by one).
        if device.type == "cuda":
            peaks = {m: _child_result(_start_child({**base, "method": m}), m) for m in methods}
        else:
            children = {m: _start_child({**base, "method": m}) for m in methods}
            peaks = {m: _child_result(child, m) for m, child in children.items()}
    smf, full = peaks["smf_kl"], peaks["full_ft"]
    how = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
           "peak resident set size (VmHWM of /proc/self/status, else ru_maxrss)")
    return {"smf_peak_mem_vs_full_ft_ratio": smf["peak_mb"] / full["peak_mb"],
            "smf_peak_mem_increase_vs_full_ft_ratio": (smf["peak_mb"] - smf["setup_mb"]) /
                                                      max(full["peak_mb"] - full["setup_mb"], 1e-9),
            "peak_mem_mb": peaks, "memory_steps": MEMORY_STEPS,
            "memory_measured_by": f"{how}, one child process per method: model + memory loaded, then "
                                  f"{MEMORY_STEPS} training steps"}


# ---------------------------------------------------------------- our memory layer vs the reference PKM

def _reference_pkm(dim: int, memory: MemoryConfig) -> tuple[torch.nn.Module, dict]:
    """The `product-key-memory` package's PKM at the sizes of `memory`, and the config used."""
    from importlib.metadata import version

    from product_key_memory import PKM

    config = {"dim": dim, "heads": memory.heads, "num_keys": memory.n_keys, "topk": memory.topk,
              "dim_head": memory.key_dim // 2}
    note = ("dim_head is PKM's size of each of the two sub-keys, so dim_head=key_dim/2 gives the same query size; "
            "PKM defaults otherwise (layernormed queries, softmax over the top-k, values of size dim)")
    return PKM(**config), {"package": f"product-key-memory {version('product-key-memory')}", "class": "PKM",
                           "config": config, "note": note}


def bench_pkm(dim: int, memory: MemoryConfig, repeats: int, device: torch.device, batch: int = BATCH,
              seq_len: int = SEQ_LEN) -> dict:
    """Forward + backward of our memory layer and the reference PKM, same sizes and input, interleaved."""
    try:
        reference, ref_config = _reference_pkm(dim, memory)
    except ImportError:
        return {"pkm_vs_reference_ratio": None, "pkm_reference": "not installed: pip install product-key-memory"}
    torch.manual_seed(0)
    ours = memory.build(dim).to(device)
    reference = reference.to(device)
    x, grad = torch.randn(batch, seq_len, dim, device=device), torch.randn(batch, seq_len, dim, device=device)
    if ours(x).shape != reference(x).shape:
        raise RuntimeError(f"Output shapes differ: ours {tuple(ours(x).shape)}, "
                           f"reference {tuple(reference(x).shape)}.")

    def step(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            (module(x) * grad).sum().backward()
        return run

    times = interleaved({"ours": step(ours), "reference": step(reference)}, repeats, device)
    ours_s, ref_s = median(times["ours"]), median(times["reference"])
    params = {"ours": sum(p.numel() for p in ours.parameters()),
              "reference": sum(p.numel() for p in reference.parameters())}
    return {"pkm_vs_reference_ratio": ours_s / ref_s, "pkm_seconds": {"ours": ours_s, "reference": ref_s},
            "pkm_reference": {**ref_config, "input": [batch, seq_len, dim], "params": params}}


# ---------------------------------------------------------------- scaling

@torch.no_grad()
def bench_scaling(dim: int, config: MemoryConfig, repeats: int, device: torch.device, batch: int = BATCH) -> dict:
    """Our memory layer's forward time as slots grow (seq 64) and as the sequence grows (the profile's slots)."""

    def seconds(memory: torch.nn.Module, x: torch.Tensor) -> float:
        return median(interleaved({"f": lambda: memory(x)}, repeats, device)["f"])

    slots = []
    for n_keys in SLOT_SCALING_KEYS:
        memory = MemoryConfig.from_dict({**asdict(config), "n_keys": n_keys}).build(dim).to(device)
        slots.append({"slots": n_keys**2, "seconds": seconds(memory, torch.randn(batch, SEQ_LEN, dim, device=device))})
        del memory
    memory = config.build(dim).to(device)
    lengths = [{"seq_len": n, "seconds": seconds(memory, torch.randn(batch, n, dim, device=device))}
               for n in SEQ_SCALING]
    return {"memory_scaling": {"batch": batch, "by_slots": slots, "by_seq_len": lengths,
                               "slots_at_fixed": config.n_keys**2, "seq_len_at_fixed": SEQ_LEN}}


# ---------------------------------------------------------------- the suite

def hardware_info(device: torch.device) -> dict:
    """Where the figures were measured."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def _prepare(profile: Profile, device: torch.device, progress: bool):
    """Base model on `device`, a calibrated retrofitted copy, background texts and slot statistics."""
    base, tokenizer = load_base_model(profile.model)
    base = base.to(device)
    retro = copy.deepcopy(base)
    texts = load_background()
    stats = prepare_memory(retro, tokenizer, texts[:48], profile.memory, progress)
    return base, retro, tokenizer, texts, stats


def run_bench(profile: str | Profile | None = "cpu", out: str | Path | None = None, repeats: int = 7,
              progress: bool = True) -> dict:
    """Run the performance suite for a profile, write `results/bench-<profile>.json` (or `out`) and return it."""
    profile = get_profile(profile)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    out = Path(out) if out is not None else Path("results") / f"bench-{profile.name}.json"
    device = default_device()
    result = {"profile": profile.name, "model": profile.model, "repeats": repeats,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware_info(device), "batch": [BATCH, SEQ_LEN], "warmup": WARMUP}
    phases, clock = tqdm(total=6, desc="bench", disable=not progress), time.perf_counter()
    base, retro, tokenizer, texts, stats = _prepare(profile, device, progress)
    dim = retro.get_input_embeddings().embedding_dim
    facts = long_facts(tokenizer, texts)
    config = asdict(retro.smf_memory_config)
    result["retrofit"] = {**config, "layers": list(config["layers"]),
                          "slots_per_layer": memory_layers(retro)[0].n_slots}
    result["phase_seconds"] = {"setup": time.perf_counter() - clock}
    phases.update()
    for name, measure in [
        ("forward", lambda: bench_forward(base, retro, text_batch(tokenizer, texts, device), repeats, device)),
        ("training steps", lambda: bench_steps(retro, tokenizer, facts, stats, repeats, device)),
        ("peak memory", lambda: bench_memory(profile.model, retro, stats, device)),
        ("pkm reference", lambda: bench_pkm(dim, profile.memory, repeats, device)),
        ("scaling", lambda: bench_scaling(dim, profile.memory, repeats, device)),
    ]:
        phases.set_postfix_str(name)
        clock = time.perf_counter()
        result.update(measure())
        result["phase_seconds"][name] = time.perf_counter() - clock
        phases.update()
    phases.close()
    result["training_batch"] = ("8 background passages of >= 64 tokens (truncated to 64) per step, loss on every "
                                "token, slot counts at one 'answer' word near the end of each (TrainConfig defaults)")
    result["targets"] = TARGETS
    write_json(out, result)
    return result


def _fmt(value) -> str:
    """A number for the table."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" if abs(value) >= 1e-3 else f"{value:.2e}"


def format_table(result: dict) -> str:
    """The contract figures against their targets, then the absolute timings."""
    lines = [f"bench: profile {result['profile']} ({result['model']}), {result['hardware']['device']}, "
             f"median of {result['repeats']} after warm-up, batch {result['batch'][0]}x{result['batch'][1]}", ""]
    lines.append(f"{'figure':<32}{'value':>10}{'target':>10}  ")
    for key in CONTRACT_KEYS:
        value, target = result.get(key), TARGETS[key]
        mark = "" if value is None or not math.isfinite(value) else ("ok" if value <= target else "above")
        lines.append(f"{key:<32}{_fmt(value):>10}{'<= ' + str(target):>10}  {mark}")
    lines += ["", "seconds (median):",
              f"  forward base / retrofitted      {_fmt(result['base_forward_seconds'])} / "
              f"{_fmt(result['retrofitted_forward_seconds'])}"]
    for method, seconds in result["step_seconds"].items():
        lines.append(f"  train step {method:<21}{_fmt(seconds)}")
    lines.append(f"  slot counts + top-t selection   {_fmt(result['selection_seconds'])}")
    if "pkm_seconds" in result:
        lines.append(f"  memory layer fwd+bwd ours / PKM {_fmt(result['pkm_seconds']['ours'])} / "
                     f"{_fmt(result['pkm_seconds']['reference'])}")
    peaks = result["peak_mem_mb"]
    lines.append(f"peak memory MB smf_kl / full_ft  {peaks['smf_kl']['peak_mb']:.0f} / "
                 f"{peaks['full_ft']['peak_mb']:.0f}"
                 f"  ({result['memory_measured_by'].split(',')[0]})")
    scaling = result["memory_scaling"]
    lines.append("memory forward by slots:   " + ", ".join(f"{s['slots']}: {_fmt(s['seconds'])}"
                                                           for s in scaling["by_slots"]))
    lines.append("memory forward by seq_len: " + ", ".join(f"{s['seq_len']}: {_fmt(s['seconds'])}"
                                                           for s in scaling["by_seq_len"]))
    return "\n".join(lines)
