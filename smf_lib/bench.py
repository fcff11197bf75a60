"""The performance suite behind `python -m smf_lib bench`: the retrofitted model against its base, one SMF training
step against full finetuning and LoRA, a batch packed against padded, held-out text scored from the first memory
block against a full forward, the cost of slot selection, peak memory, and our memory layer against the
`product-key-memory` package's `PKM`.

Everything compared is measured side by side in one process (peak memory: one short child process per method,
since a process's peak RSS never goes down), as medians of repeated runs after warm-up.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .data import Fact, load_background, load_facts, load_heldout_text
from .evaluation import score_texts, text_states
from .files import write_json
from .memory import ReadGradients
from .models import default_device, load_base_model
from .pipeline import prepare_memory
from .profiles import Profile, get_profile
from .retrofit import MemoryConfig, memory_layers
from .stats import SlotStats
from .timing import interleaved, median
from .training import Batches, TrainConfig, grad_scaler, make_optimizer, train_step
from .workloads import BATCH, SEQ_LEN, bench_memory, gpu_profile_peaks, long_facts, text_batch

CONTRACT_KEYS = ("forward_overhead_ratio", "smf_step_vs_full_ft_ratio", "smf_step_vs_lora_ratio",
                 "smf_peak_mem_vs_full_ft_ratio", "selection_overhead_frac", "pkm_vs_reference_ratio")
# Upper bounds the project aims for; the table marks each figure against them.
TARGETS = {"forward_overhead_ratio": 1.10, "smf_step_vs_full_ft_ratio": 0.35, "smf_step_vs_lora_ratio": 0.65,
           "smf_peak_mem_vs_full_ft_ratio": 0.50, "selection_overhead_frac": 0.05, "pkm_vs_reference_ratio": 0.80}
STEP_METHODS = ("smf_kl", "full_ft", "lora")
EVERY_BLOCK = "smf_kl_every_block"  # SMF-KL with the blocks below its memory run at every step
WARMUP = 1
SLOT_SCALING_KEYS = (128, 256, 512, 1024)  # 16k to 1M slots
SEQ_SCALING = (64, 128, 256, 512)


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
                 batch_size: int, seq_len: int, reuse_lower_blocks: bool = True, pack: bool = True) -> None:
        self.config = TrainConfig(method=method, batch_size=batch_size, max_length=seq_len,
                                  reuse_lower_blocks=reuse_lower_blocks, pack=pack)
        self.accelerator = Accelerator(cpu=default_device().type == "cpu")
        model, self.optimizer, self.params_trained = make_optimizer(copy.deepcopy(retro), self.config, stats)
        self.model = self.accelerator.prepare(model.eval())
        self.batches = Batches(facts, tokenizer, self.config, self.accelerator, model)
        self.scaler = grad_scaler(self.config, self.accelerator.device)

    def step(self) -> float:
        """One training step on the next batch."""
        return train_step(self.model, self.optimizer, self.batches.next(), self.config, self.accelerator, self.scaler)


def bench_steps(retro: torch.nn.Module, tokenizer, facts: Sequence[Fact], stats: SlotStats, repeats: int,
                device: torch.device, batch_size: int = BATCH, seq_len: int = SEQ_LEN,
                methods: Sequence[str] = STEP_METHODS) -> dict:
    """The trainer's step time per method, the methods' steps interleaved, SMF's also with every block run (not
    starting at the first memory block: prefix.py); and the share of an SMF step spent counting slot reads and
    choosing the top-t rows (measured inside the same steps by the optimizer)."""
    trainers = {m: _Trainer(retro, tokenizer, facts, stats, m, batch_size, seq_len) for m in methods}
    trainers[EVERY_BLOCK] = _Trainer(retro, tokenizer, facts, stats, "smf_kl", batch_size, seq_len, False)
    smf = trainers["smf_kl"].optimizer
    selection: list[float] = []

    def smf_step() -> None:
        trainers["smf_kl"].step()
        selection.append(smf.last_selection_seconds)

    steps = {m: (smf_step if m == "smf_kl" else t.step) for m, t in trainers.items()}
    times = interleaved(steps, repeats, device, warmup=WARMUP)
    seconds = {m: median(times[m]) for m in trainers}
    select_s = median(selection[WARMUP:])
    return {"step_seconds": seconds,
            "smf_step_vs_full_ft_ratio": seconds["smf_kl"] / seconds["full_ft"],
            "smf_step_vs_lora_ratio": seconds["smf_kl"] / seconds["lora"],
            "smf_step_vs_every_block_ratio": seconds["smf_kl"] / seconds[EVERY_BLOCK],
            "params_trained": {m: t.params_trained for m, t in trainers.items()},
            "selection_overhead_frac": select_s / seconds["smf_kl"], "selection_seconds": select_s,
            "selection_top_t": trainers["smf_kl"].config.top_t}


def bench_packing(retro: torch.nn.Module, tokenizer, stats: SlotStats, repeats: int, device: torch.device,
                  batch_size: int) -> dict:
    """Full finetuning's step on the bundled facts' training sentences (the tune split's; sentences of many
    lengths, unlike the bench's 64-token passages), packed and padded (packing.py), interleaved."""
    facts = load_facts(split="tune")
    trainers = {name: _Trainer(retro, tokenizer, facts, stats, "full_ft", batch_size, TrainConfig().max_length,
                               pack=name == "packed") for name in ("packed", "padded")}
    times = interleaved({name: t.step for name, t in trainers.items()}, repeats, device, warmup=WARMUP)
    seconds = {name: median(t) for name, t in times.items()}
    return {"packed_step_seconds": seconds, "packed_vs_padded_step_ratio": seconds["packed"] / seconds["padded"]}


def bench_heldout_scoring(retro: torch.nn.Module, tokenizer, repeats: int, device: torch.device,
                          n_texts: int = 16) -> dict:
    """Scoring held-out paragraphs as every checkpoint does (`score_texts`): with a full forward, and from the
    states entering the first memory block, as for a model whose lower blocks are the base's (`heldout_scores`)."""
    texts = load_heldout_text()[:n_texts]
    states = text_states(retro, tokenizer, texts)
    fns = {"full": lambda: score_texts(retro, tokenizer, texts),
           "from_memory": lambda: score_texts(retro, tokenizer, texts, states=states)}
    seconds = {name: median(t) for name, t in interleaved(fns, repeats, device, warmup=WARMUP).items()}
    return {"heldout_scoring_seconds": seconds,
            "heldout_scoring_from_memory_ratio": seconds["from_memory"] / seconds["full"]}


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
    """Forward + backward of our memory layer and the reference PKM, same sizes and input, interleaved: ours as sparse
    training runs it, its value gradient kept factored and formed for top-t rows (the contract figure), and ours with
    a dense value gradient like the reference's."""
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

    factored = copy.deepcopy(ours)
    factored.read_gradients = ReadGradients()
    with torch.no_grad():  # the rows a step forms: the top-t most read, as a selection would take them
        indices, weights = ours.address(x.reshape(-1, dim))
        counts = torch.bincount(indices.flatten(), weights.flatten(), ours.n_slots)
        rows = counts.topk(min(TrainConfig().top_t, ours.n_slots)).indices

    def step(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            (module(x) * grad).sum().backward()
            if getattr(module, "read_gradients", None) is not None:
                module.read_gradients.rows(rows)
                module.read_gradients.clear()
        return run

    times = interleaved({"ours": step(factored), "ours_dense": step(ours), "reference": step(reference)}, repeats,
                        device)
    seconds = {name: median(t) for name, t in times.items()}
    params = {"ours": sum(p.numel() for p in ours.parameters()),
              "reference": sum(p.numel() for p in reference.parameters())}
    return {"pkm_vs_reference_ratio": seconds["ours"] / seconds["reference"],
            "pkm_dense_vs_reference_ratio": seconds["ours_dense"] / seconds["reference"], "pkm_seconds": seconds,
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
              progress: bool = True, gpu_budget: bool | None = None) -> dict:
    """Run the performance suite for a profile, write `results/bench-<profile>.json` (or `out`) and return it.

    `gpu_budget` (default: on for the cpu and gpu profiles) adds the gpu profile's peak memory per method, measured
    on a stand-in of its model (`workloads.gpu_profile_peaks`)."""
    profile = get_profile(profile)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    out = Path(out) if out is not None else Path("results") / f"bench-{profile.name}.json"
    device = default_device()
    result = {"profile": profile.name, "model": profile.model, "repeats": repeats,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware_info(device), "batch": [BATCH, SEQ_LEN], "warmup": WARMUP}
    # The gpu profile's budget, on a stand-in of its model, from the profiles that can run it offline.
    budget = profile.name in ("cpu", "gpu") if gpu_budget is None else gpu_budget
    phases, clock = tqdm(total=8 + budget, desc="bench", disable=not progress), time.perf_counter()
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
        ("packing", lambda: bench_packing(retro, tokenizer, stats, repeats, device, profile.train.batch_size)),
        ("held-out scoring", lambda: bench_heldout_scoring(retro, tokenizer, repeats, device)),
        ("peak memory", lambda: bench_memory(profile.model, retro, stats, device)),
        ("pkm reference", lambda: bench_pkm(dim, profile.memory, repeats, device)),
        ("scaling", lambda: bench_scaling(dim, profile.memory, repeats, device)),
    ] + [("gpu profile budget", lambda: gpu_profile_peaks(device=device))] * budget:
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
    lines.append(f"  SMF step / with every block     {_fmt(result['smf_step_vs_every_block_ratio'])}")
    lines.append(f"  full-FT step packed / padded    {_fmt(result['packed_vs_padded_step_ratio'])}  (bundled facts)")
    lines.append(f"  held-out text from block / full {_fmt(result['heldout_scoring_from_memory_ratio'])}")
    if "pkm_seconds" in result:
        pkm = result["pkm_seconds"]
        lines.append(f"  memory layer fwd+bwd ours / PKM {_fmt(pkm['ours'])} / {_fmt(pkm['reference'])}"
                     f"  (ours with a dense value gradient: {_fmt(pkm['ours_dense'])})")
    peaks = result["peak_mem_mb"]
    lines.append(f"peak memory MB smf_kl / full_ft  {peaks['smf_kl']['peak_mb']:.0f} / "
                 f"{peaks['full_ft']['peak_mb']:.0f}"
                 f"  ({result['memory_measured_by'].split(',')[0]})")
    if "gpu_profile_peak_mb" in result:
        budget = result["gpu_profile_budget"]
        lines.append(f"gpu profile peak MB on {budget['model']}: " + ", ".join(
            f"{m} {mb:.0f}" for m, mb in result["gpu_profile_peak_mb"].items()) + f"  (a T4 has {budget['t4_mb']})")
    scaling = result["memory_scaling"]
    lines.append("memory forward by slots:   " + ", ".join(f"{s['slots']}: {_fmt(s['seconds'])}"
                                                           for s in scaling["by_slots"]))
    lines.append("memory forward by seq_len: " + ", ".join(f"{s['seq_len']}: {_fmt(s['seconds'])}"
                                                           for s in scaling["by_seq_len"]))
    return "\n".join(lines)
