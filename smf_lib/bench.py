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
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .calibration import calibrate_queries
from .data import Fact, load_background
from .memory import ProductKeyMemory
from .models import PROFILES, load_base_model
from .retrofit import MemoryConfig, load_memory, memory_layers, retrofit, save_memory
from .stats import SlotStats, collect_background, recording, slot_counts
from .training import SparseUpdate, TrainConfig, build_examples, collate, counted_positions, token_loss_sum, train

CONTRACT_KEYS = ("forward_overhead_ratio", "smf_step_vs_full_ft_ratio", "smf_step_vs_lora_ratio",
                 "smf_peak_mem_vs_full_ft_ratio", "selection_overhead_frac", "pkm_vs_reference_ratio")
# Upper bounds the project aims for; the table marks each figure against them.
TARGETS = {"forward_overhead_ratio": 1.10, "smf_step_vs_full_ft_ratio": 0.35, "smf_step_vs_lora_ratio": 0.65,
           "smf_peak_mem_vs_full_ft_ratio": 0.55, "selection_overhead_frac": 0.05, "pkm_vs_reference_ratio": 0.80}
STEP_METHODS = ("smf_kl", "full_ft", "lora")
BATCH, SEQ_LEN, WARMUP = 8, 64, 1
SELECTION_REPEATS = 3   # selection is a small, steady share of the step: a few SMF steps are enough
SLOT_SCALING_KEYS = (128, 256, 512)
SEQ_SCALING = (64, 128, 256, 512)
MEMORY_STEPS = 2        # the second step holds weights, gradients, optimizer state and activations at once


# ---------------------------------------------------------------- timing helpers

def _device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of `fn`, GPU work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1) -> dict[str, list[float]]:
    """Time every function `repeats` times in rotation (a, b, a, b, ...) after `warmup` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            seconds = _time(fn, device)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def _median(values: Sequence[float]) -> float:
    """The median of a non-empty list."""
    return float(statistics.median(values))


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


def text_batch(tokenizer, texts: Sequence[str], device: torch.device, batch: int = BATCH, seq_len: int = SEQ_LEN) -> dict[str, torch.Tensor]:
    """A (batch, seq_len) batch of real text with no padding."""
    enc = tokenizer([" ".join(c) for c in _chunks(tokenizer, texts, batch, seq_len)], return_tensors="pt", truncation=True, max_length=seq_len)
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
        facts.append(Fact(f"bench{i:03d}", _answer_word(tokenizer, chunk, seq_len), (chunk,), passages[0], (passages[0],)))
    return facts


# ---------------------------------------------------------------- forward overhead

@torch.no_grad()
def bench_forward(base: torch.nn.Module, retro: torch.nn.Module, batch: dict, repeats: int, device: torch.device) -> dict:
    """Base and retrofitted forward (no grad) on the same batch, interleaved."""
    times = _interleaved({"base": lambda: base(**batch), "retrofitted": lambda: retro(**batch)}, repeats, device)
    base_s, retro_s = _median(times["base"]), _median(times["retrofitted"])
    return {"forward_overhead_ratio": retro_s / base_s, "base_forward_seconds": base_s, "retrofitted_forward_seconds": retro_s}


# ---------------------------------------------------------------- training steps

class _TakeTurns:
    """Lets threads run one at a time, in rotation: a thread works only while it holds the turn."""

    def __init__(self, n: int) -> None:
        self.cond, self.turn, self.active = threading.Condition(), 0, list(range(n))

    def wait(self, i: int) -> None:
        """Block until thread `i` holds the turn."""
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def pass_on(self, i: int, finished: bool = False) -> None:
        """Hand the turn to the next active thread; a finished thread leaves the rotation."""
        with self.cond:
            position = self.active.index(i)
            if finished:
                self.active.remove(i)
                position -= 1
            if self.active:
                self.turn = self.active[(position + 1) % len(self.active)]
            self.cond.notify_all()


def _train_in_turn(i: int, turns: _TakeTurns, run: Callable[[Callable], object], steps: int, errors: list) -> None:
    """Thread body: run `run(callback)` step by step, yielding the turn after each step but the last."""
    def callback(step: int, model) -> None:
        if step < steps:
            turns.pass_on(i)
            turns.wait(i)

    turns.wait(i)
    try:
        run(callback)
    except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
        errors.append(error)
    finally:
        turns.pass_on(i, finished=True)


def bench_steps(retro: torch.nn.Module, tokenizer, facts: Sequence[Fact], stats: SlotStats, repeats: int,
                batch_size: int = BATCH, seq_len: int = SEQ_LEN, methods: Sequence[str] = STEP_METHODS) -> dict:
    """`train()` step time per method, the methods' steps interleaved (one thread each, taking turns)."""
    steps = WARMUP + repeats
    histories: dict[str, object] = {}
    models = {m: copy.deepcopy(retro) for m in methods}

    def runner(method: str) -> Callable[[Callable], None]:
        config = TrainConfig(method=method, steps=steps, batch_size=batch_size, max_length=seq_len)

        def run(callback: Callable) -> None:
            histories[method] = train(models[method], tokenizer, facts, config, background=stats,
                                      callback=callback, progress=False)[1]
        return run

    turns, errors = _TakeTurns(len(methods)), []
    threads = [threading.Thread(target=_train_in_turn, args=(i, turns, runner(m), steps, errors)) for i, m in enumerate(methods)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    seconds = {m: _median(histories[m].seconds[WARMUP:]) for m in methods}
    return {"step_seconds": seconds,
            "smf_step_vs_full_ft_ratio": seconds["smf_kl"] / seconds["full_ft"],
            "smf_step_vs_lora_ratio": seconds["smf_kl"] / seconds["lora"],
            "params_trained": {m: histories[m].params_trained for m in methods}}


# ---------------------------------------------------------------- selection overhead

def _smf_step(model, update: SparseUpdate, batch: dict, device: torch.device) -> tuple[float, float]:
    """One SMF step as `train()` does it; returns (step seconds, scoring + selection seconds)."""
    _sync(device)
    start = time.perf_counter()
    with recording(model):
        loss_sum, n_tokens = token_loss_sum(model, batch, update.config.loss_on)
        (loss_sum / n_tokens.sum().clamp_min(1)).backward()
        _sync(device)
        select_start = time.perf_counter()
        rows = update.rows(slot_counts(model, counted_positions(batch, update.config.count_on)))
        _sync(device)
        selection = time.perf_counter() - select_start
    update.optimizer.step(rows)
    for m in update.layers:
        m.values.weight.grad = None
    loss_sum.item()
    _sync(device)
    return time.perf_counter() - start, selection


def bench_selection(retro: torch.nn.Module, tokenizer, facts: Sequence[Fact], stats: SlotStats, repeats: int,
                    batch_size: int = BATCH, seq_len: int = SEQ_LEN) -> dict:
    """Share of an SMF step spent counting slot accesses and choosing the top-t rows (slot_counts + rows)."""
    model = copy.deepcopy(retro)
    config = TrainConfig(method="smf_kl", batch_size=batch_size, max_length=seq_len)
    update = SparseUpdate(model, config, stats)
    device = next(model.parameters()).device
    examples = build_examples(facts, tokenizer, seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps, selections = [], []
    for i in range(WARMUP + repeats):
        start = i * batch_size % len(examples)
        batch = collate((examples + examples)[start:start + batch_size], pad_id, device)
        step, selection = _smf_step(model, update, batch, device)
        if i >= WARMUP:
            steps.append(step)
            selections.append(selection)
    step_s, select_s = _median(steps), _median(selections)
    return {"selection_overhead_frac": select_s / step_s, "selection_seconds": select_s, "smf_loop_step_seconds": step_s,
            "selection_top_t": config.top_t}


# ---------------------------------------------------------------- peak memory (child processes)

def _peak_child(spec: str) -> None:
    """Child-process entry: load the model and memory, train a few steps, print the peak memory as JSON."""
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    model, tokenizer = load_base_model(args["model"])
    # Retrofit first: load_memory then fills the memory in place (on a bare model it would check on a full copy).
    fields = args["memory_config"]
    model = load_memory(retrofit(model.to(device), MemoryConfig(**{**fields, "layers": tuple(fields["layers"])})), args["memory"])
    stats = SlotStats.load(args["stats"]) if args["method"].startswith("smf") else None
    facts = long_facts(tokenizer, load_background(), seq_len=args["seq_len"])
    config = TrainConfig(method=args["method"], steps=args["steps"], batch_size=args["batch"], max_length=args["seq_len"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak_mb(device)
    train(model, tokenizer, facts, config, background=stats, progress=False)
    print(json.dumps({"setup_mb": before, "peak_mb": _peak_mb(device)}))


def _peak_mb(device: torch.device) -> float:
    """Peak memory so far in MB: CUDA allocator peak, or this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():  # Linux: ru_maxrss would include the parent's RSS at fork time; VmHWM is this program's own
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**10
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB elsewhere


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
                 batch_size: int = BATCH, seq_len: int = SEQ_LEN, methods: Sequence[str] = ("smf_kl", "full_ft")) -> dict:
    """Peak memory of a short training run per method, each in its own child process."""
    with tempfile.TemporaryDirectory() as tmp:
        memory, stats_path = save_memory(retro, Path(tmp) / "memory.safetensors"), stats.save(Path(tmp) / "stats.safetensors")
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
            "smf_peak_mem_increase_vs_full_ft_ratio": (smf["peak_mb"] - smf["setup_mb"]) / max(full["peak_mb"] - full["setup_mb"], 1e-9),
            "peak_mem_mb": peaks, "memory_steps": MEMORY_STEPS,
            "memory_measured_by": f"{how}, one child process per method: model + memory loaded, then {MEMORY_STEPS} training steps"}


# ---------------------------------------------------------------- our memory layer vs the reference PKM

def _our_memory(dim: int, n_keys: int = 128) -> ProductKeyMemory:
    """Our memory layer with the retrofit defaults (MemoryConfig)."""
    c = MemoryConfig()
    return ProductKeyMemory(dim, n_keys, c.heads, c.topk, c.key_dim, temperature=c.temperature,
                            qk_norm=c.qk_norm, output_scale=c.output_scale)


def _reference_pkm(dim: int) -> tuple[torch.nn.Module, dict]:
    """The `product-key-memory` package's PKM at our default sizes, and the config used."""
    from importlib.metadata import version

    from product_key_memory import PKM

    c = MemoryConfig()
    config = {"dim": dim, "heads": c.heads, "num_keys": c.n_keys, "topk": c.topk, "dim_head": c.key_dim // 2}
    note = ("dim_head is PKM's size of each of the two sub-keys, so dim_head=key_dim/2 gives the same query size; "
            "PKM defaults otherwise (layernormed queries, softmax over the top-k, values of size dim)")
    return PKM(**config), {"package": f"product-key-memory {version('product-key-memory')}", "class": "PKM",
                           "config": config, "note": note}


def bench_pkm(dim: int, repeats: int, device: torch.device, batch: int = BATCH, seq_len: int = SEQ_LEN) -> dict:
    """Forward + backward of our memory layer and the reference PKM, same sizes and input, interleaved."""
    try:
        reference, ref_config = _reference_pkm(dim)
    except ImportError:
        return {"pkm_vs_reference_ratio": None, "pkm_reference": "not installed: pip install product-key-memory"}
    torch.manual_seed(0)
    ours = _our_memory(dim).to(device)
    reference = reference.to(device)
    x, grad = torch.randn(batch, seq_len, dim, device=device), torch.randn(batch, seq_len, dim, device=device)
    if ours(x).shape != reference(x).shape:
        raise RuntimeError(f"Output shapes differ: ours {tuple(ours(x).shape)}, reference {tuple(reference(x).shape)}.")

    def step(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            (module(x) * grad).sum().backward()
        return run

    times = _interleaved({"ours": step(ours), "reference": step(reference)}, repeats, device)
    ours_s, ref_s = _median(times["ours"]), _median(times["reference"])
    params = {"ours": sum(p.numel() for p in ours.parameters()), "reference": sum(p.numel() for p in reference.parameters())}
    return {"pkm_vs_reference_ratio": ours_s / ref_s, "pkm_seconds": {"ours": ours_s, "reference": ref_s},
            "pkm_reference": {**ref_config, "input": [batch, seq_len, dim], "params": params}}


# ---------------------------------------------------------------- scaling

@torch.no_grad()
def bench_scaling(dim: int, repeats: int, device: torch.device, batch: int = BATCH) -> dict:
    """Our memory layer's forward time as slots grow (seq 64) and as the sequence grows (16k slots)."""
    slots = []
    for n_keys in SLOT_SCALING_KEYS:
        memory, x = _our_memory(dim, n_keys).to(device), torch.randn(batch, SEQ_LEN, dim, device=device)
        slots.append({"slots": n_keys**2, "seconds": _median(_interleaved({"f": lambda: memory(x)}, repeats, device)["f"])})
        del memory
    memory, lengths = _our_memory(dim).to(device), []
    for seq_len in SEQ_SCALING:
        x = torch.randn(batch, seq_len, dim, device=device)
        lengths.append({"seq_len": seq_len, "seconds": _median(_interleaved({"f": lambda: memory(x)}, repeats, device)["f"])})
    return {"memory_scaling": {"batch": batch, "by_slots": slots, "by_seq_len": lengths,
                               "slots_at_fixed": 128**2, "seq_len_at_fixed": SEQ_LEN}}


# ---------------------------------------------------------------- the suite

def hardware_info(device: torch.device) -> dict:
    """Where the figures were measured."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def _prepare(profile: str, device: torch.device, progress: bool):
    """Base model on `device`, a calibrated retrofitted copy, background texts and slot statistics."""
    base, tokenizer = load_base_model(PROFILES[profile])
    base = base.to(device)
    retro = retrofit(copy.deepcopy(base), MemoryConfig())
    texts = load_background()
    calibrate_queries(retro, tokenizer, texts[:48], progress=progress)
    stats = collect_background(retro, tokenizer, texts[:24], progress=progress)  # enough for timing the selection
    return base, retro, tokenizer, texts, stats


def _write_json(result: dict, out: Path) -> None:
    """Write JSON (indent 2) to a temporary sibling, then rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_bench(profile: str = "cpu", out: str | Path | None = None, repeats: int = 7, progress: bool = True) -> dict:
    """Run the performance suite for a profile, write `results/bench-<profile>.json` (or `out`) and return it."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}; choose one of {', '.join(PROFILES)}.")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    out = Path(out) if out is not None else Path("results") / f"bench-{profile}.json"
    device = _device()
    result = {"profile": profile, "model": PROFILES[profile], "repeats": repeats,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware_info(device), "batch": [BATCH, SEQ_LEN], "warmup": WARMUP}
    phases, clock = tqdm(total=7, desc="bench", disable=not progress), time.perf_counter()
    base, retro, tokenizer, texts, stats = _prepare(profile, device, progress)
    dim = retro.get_input_embeddings().embedding_dim
    facts = long_facts(tokenizer, texts)
    result["retrofit"] = {"layers": list(retro.smf_memory_config.layers), "slots_per_layer": memory_layers(retro)[0].n_slots}
    result["phase_seconds"] = {"setup": time.perf_counter() - clock}
    phases.update()
    for name, measure in [
        ("forward", lambda: bench_forward(base, retro, text_batch(tokenizer, texts, device), repeats, device)),
        ("training steps", lambda: bench_steps(retro, tokenizer, facts, stats, repeats)),
        ("selection", lambda: bench_selection(retro, tokenizer, facts, stats, min(repeats, SELECTION_REPEATS))),
        ("peak memory", lambda: bench_memory(PROFILES[profile], retro, stats, device)),
        ("pkm reference", lambda: bench_pkm(dim, repeats, device)),
        ("scaling", lambda: bench_scaling(dim, repeats, device)),
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
    _write_json(result, out)
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
              f"  forward base / retrofitted      {_fmt(result['base_forward_seconds'])} / {_fmt(result['retrofitted_forward_seconds'])}"]
    for method, seconds in result["step_seconds"].items():
        lines.append(f"  train step {method:<21}{_fmt(seconds)}")
    lines.append(f"  slot counts + top-t selection   {_fmt(result['selection_seconds'])}")
    if "pkm_seconds" in result:
        lines.append(f"  memory layer fwd+bwd ours / PKM {_fmt(result['pkm_seconds']['ours'])} / {_fmt(result['pkm_seconds']['reference'])}")
    peaks = result["peak_mem_mb"]
    lines.append(f"peak memory MB smf_kl / full_ft  {peaks['smf_kl']['peak_mb']:.0f} / {peaks['full_ft']['peak_mb']:.0f}"
                 f"  ({result['memory_measured_by'].split(',')[0]})")
    scaling = result["memory_scaling"]
    lines.append("memory forward by slots:   " + ", ".join(f"{s['slots']}: {_fmt(s['seconds'])}" for s in scaling["by_slots"]))
    lines.append("memory forward by seq_len: " + ", ".join(f"{s['seq_len']}: {_fmt(s['seconds'])}" for s in scaling["by_seq_len"]))
    return "\n".join(lines)
