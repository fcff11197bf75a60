"""Training on new facts: sparse memory finetuning (KL, TF-IDF, random slots) and the dense baselines."""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .augment import told_of_a_stranger
from .batches import COUNT_POSITIONS, Example, answer_tokens, build_examples, collate, counted_positions, negative_rows
from .data import Fact
from .losses import predicting
from .models import default_device, pad_id
from .optim import RULES, WRITE_ON, SparseMemoryOptimizer
from .packing import packed, packs_exactly, token_losses
from .prefix import block_inputs, first_memory_block
from .retrofit import decoder_layers, memory_layers
from .stats import BACKGROUND_POSITIONS, SlotStats, recording

SPARSE_METHODS = ("smf_kl", "smf_tfidf", "smf_random")
DENSE_METHODS = ("full_ft", "lora")
METHODS = SPARSE_METHODS + DENSE_METHODS
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DENSE_SCOPES = ("all", "memory_mlps")  # full finetuning: every base parameter, or the MLPs beside the memory
LOSS_ON = ("all", "answer", "not_subject")
LOCALITY_TOKENS = 1024  # background tokens sampled per step for the locality term
DEFAULT_LR = {"smf_kl": 3.0, "smf_tfidf": 3.0, "smf_random": 3.0, "full_ft": 3e-5, "lora": 3e-4}


@dataclass
class TrainConfig:
    """How to train. `lr=None` takes the method's default (DEFAULT_LR)."""

    method: str = "smf_kl"
    steps: int = 100
    batch_size: int = 8
    lr: float | None = None
    optimizer: str = "adam"          # sparse methods: one of optim.RULES, "adam" (row-wise Adam/AdamW) by default
    weight_decay: float = 0.0
    top_t: int = 500                 # value rows per memory layer per step
    loss_on: str = "not_subject"     # LOSS_ON: every token but the subject's (a question names it), "all", "answer"
    loss_floor: float = 0.0          # tokens predicted with a loss below this (nats) give no gradient
    count_on: str = "entities"       # slots counted at the subject and inside the answer; see counted_positions
    write_on: str = "read"           # sparse methods: rows learn from all their reads, or only at counted positions
    background_on: str = "all"       # where the background's slot use was counted: stats.BACKGROUND_POSITIONS
    warmup: int = 0                  # steps over which the learning rate rises linearly to lr
    locality: float = 0.0            # sparse methods: weight of locality_penalty in the loss
    gate_lr: float = 0.0             # sparse methods: Adam's rate for the memory's output gates (0: frozen)
    row_dropout: float = 0.0         # sparse methods: probability that a value row is left out of a step's reads
    negatives: float = 0.0           # weight of the unlikelihood of the answer in sentences about made-up subjects
    dense_scope: str = "all"         # full finetuning: one of DENSE_SCOPES (see make_optimizer)
    lora_rank: int = 16
    max_length: int = 256            # tokens per training sentence, at most; a longer one is an error, never cut
    precision: str = "auto"          # the forward's autocast precision: "auto" (see autocast_dtype), "fp32", ...
    reuse_lower_blocks: bool = True  # nothing trained below the memory: its lower blocks run once per sentence
    pack: bool = True                # a batch's sentences run as one row, without padding (packing.py)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.optimizer not in RULES or self.loss_on not in LOSS_ON:
            raise ValueError(f"optimizer must be one of {', '.join(RULES)}; loss_on one of {', '.join(LOSS_ON)}.")
        for name in ("locality", "gate_lr", "row_dropout"):
            value = getattr(self, name)
            if value < 0 or (value and self.method not in SPARSE_METHODS):
                raise ValueError(f"{name} must be >= 0 and is for sparse methods only, got {value} for "
                                 f"{self.method}.")
        if self.count_on not in COUNT_POSITIONS:
            raise ValueError(f"count_on must be one of {', '.join(COUNT_POSITIONS)}, got {self.count_on!r}.")
        if self.write_on not in WRITE_ON or (self.write_on == "counted" and self.locality):
            raise ValueError(f"write_on must be one of {', '.join(WRITE_ON)}, got {self.write_on!r}; 'counted' "
                             "does not combine with a locality term (its reads are at no counted position).")
        if self.background_on not in BACKGROUND_POSITIONS:
            raise ValueError(f"background_on must be one of {', '.join(BACKGROUND_POSITIONS)}, "
                             f"got {self.background_on!r}.")
        if self.loss_floor < 0:
            raise ValueError(f"loss_floor must be a loss in nats >= 0, got {self.loss_floor}.")
        if self.negatives < 0:
            raise ValueError(f"negatives must be a loss weight >= 0, got {self.negatives}.")
        if self.warmup < 0:
            raise ValueError(f"warmup must be a number of steps >= 0, got {self.warmup}.")
        if self.dense_scope not in DENSE_SCOPES or (self.dense_scope != "all" and self.method != "full_ft"):
            raise ValueError(f"dense_scope must be one of {', '.join(DENSE_SCOPES)}, and other than 'all' only for "
                             f"full_ft; got {self.dense_scope!r} for {self.method}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.precision == "fp16" and self.method in SPARSE_METHODS:
            raise ValueError("fp16 needs loss scaling, which sparse memory finetuning's factored gradients do not "
                             "take: use precision='bf16' or 'fp32' for it.")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]


@dataclass
class History:
    """Per-step loss, selected rows per layer and time, plus whatever the callback returned at checkpoints."""

    loss: list[float] = field(default_factory=list)
    selected: list[dict[int, int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    params_trained: int = 0


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_on: str, floor: float = 0.0,
                   negatives: float = 0.0, pack: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over the positive sentences' tokens that `loss_on` trains, and how many there are.

    A token already predicted with a loss below `floor` gives no gradient (the clamp's): training stops pushing what
    it has learned, so the weights move no further than learning needs. In a negative sentence only the answer's
    first token counts, with the unlikelihood loss -log(1 - p) (Welleck et al. 2019, arXiv 1908.04319) weighted by
    `negatives`: another subject must not be given this answer. With `pack` the batch's sentences run as one row
    (packing.py).
    """
    negative = negative_rows(batch)
    trained = predicting(batch["answer"] if loss_on == "answer" else batch["attention_mask"]) & ~negative
    if loss_on == "not_subject":  # a question names its subject: spelling a made-up one is not the fact
        trained &= ~predicting(batch["subject"] & ~batch["answer"])  # an answer that names the subject is learned
    losses = token_losses(model, batch, pack)
    unlikely = _unlikelihood(losses, batch["answer"], negative) if negatives else 0.0
    if floor:
        losses = losses.clamp_min(floor)
    return (losses * trained).sum() + negatives * unlikely, trained.sum()


def _unlikelihood(losses: torch.Tensor, answer: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Summed -log(1 - p) of each negative sentence's first answer token, from the positions' next-token losses."""
    first = answer.clone()
    first[:, 1:] &= ~answer[:, :-1]
    return -torch.log1p(-torch.exp(-losses[predicting(first) & negative].float()).clamp(max=1 - 1e-6)).sum()


SCORE_OF = {"smf_kl": "kl", "smf_tfidf": "tfidf", "smf_random": "random"}


def make_optimizer(model: torch.nn.Module, config: TrainConfig, background: SlotStats | None = None,
                   accelerator: Accelerator | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """Set `model` up for the configured method; return (model, optimizer, number of trained parameters).

    Sparse methods get a `SparseMemoryOptimizer` on the value tables (slot counts summed across processes when an
    `accelerator` runs several); full finetuning trains every base parameter and LoRA its adapters, both with AdamW.
    With `dense_scope="memory_mlps"` full finetuning trains only the MLPs of the blocks that hold memory layers:
    a dense update in the place where the memory writes (the single-layer finetuning baseline of Zhu et al. 2020,
    arXiv 2012.00363), which tells what the memory's sparsity costs apart from its place.
    """
    if config.method in SPARSE_METHODS:
        reduce = None if accelerator is None or accelerator.num_processes == 1 else (
            lambda counts: accelerator.reduce(counts, "sum"))
        optimizer = SparseMemoryOptimizer(model, background, config.lr, SCORE_OF[config.method], config.top_t,
                                          config.optimizer, config.weight_decay, config.seed, reduce, factored=True,
                                          write_on=config.write_on, gate_lr=config.gate_lr,
                                          row_dropout=config.row_dropout)
        return model, optimizer, sum(p.numel() for p in model.parameters() if p.requires_grad)  # tables (and gates)
    model.requires_grad_(False)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        memory_names = {n for n, m in model.named_modules() if m in set(memory_layers(model))}
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and not any(n.startswith(mn) for mn in memory_names) and not n.endswith("lm_head")]
        model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                                 lora_dropout=0.0, target_modules=targets))
    else:
        memory = {id(p) for m in memory_layers(model) for p in m.parameters()}
        for p in _dense_parameters(model, config.dense_scope):
            p.requires_grad_(id(p) not in memory)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one pass over each tensor instead of a dozen elementwise ops (CPU and CUDA both have the kernel)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    return model, optimizer, sum(p.numel() for p in params)


def _dense_parameters(model: torch.nn.Module, scope: str) -> list[torch.nn.Parameter]:
    """The parameters full finetuning may train: all, or those of the MLPs beside the memory layers."""
    if scope == "all":
        return list(model.parameters())
    blocks = decoder_layers(model)
    mlps = [blocks[m.layer_index].mlp.mlp for m in memory_layers(model)]
    if not mlps or any(mlp is None for mlp in mlps):
        raise ValueError("dense_scope='memory_mlps' trains the MLPs beside the memory layers: retrofit the model "
                         "with memory layers in additive mode (MemoryConfig(mode='additive')).")
    return [p for mlp in mlps for p in mlp.parameters()]


def locality_penalty(model: torch.nn.Module, inputs: dict[int, torch.Tensor], n_tokens: int,
                     generator: torch.Generator) -> torch.Tensor:
    """How loudly the memory speaks on background text: its squared output at `n_tokens` sampled background
    tokens, relative to the squared layer input there, summed over memory layers.

    The retrofitted memory's output is zero, so this keeps trained rows from changing what the model computes on
    text unlike the new facts (a locality term as in Meng et al. 2022, arXiv 2202.05262, on the memory's output
    rather than the logits: one memory lookup instead of a forward pass). `inputs` are the layers' inputs on
    background text (`SlotStats.inputs`); these reads are not counted for selection.
    """
    total = torch.zeros(())
    with recording(model, enabled=False):
        for m in memory_layers(model):
            x = inputs[m.layer_index]
            x = x[torch.randint(len(x), (n_tokens,), generator=generator)].to(m.values.weight.device)
            out = m(x)
            total = total.to(out.device) + out.pow(2).sum(-1).mean() / x.pow(2).sum(-1).mean()
    return total


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype of training's forward under autocast, None for fp32; weights, gradients and optimizer state stay
    fp32, and the memory layer reads in fp32 either way.

    "auto" takes bf16 on a GPU that has it. On one that has not (a T4) the dense methods take fp16 with loss
    scaling and sparse memory finetuning fp32 (its factored gradients take no loss scaling, and its backward is
    short). On the CPU it takes fp32, so that results stay comparable between machines.
    """
    precision = config.precision
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        elif torch.cuda.is_bf16_supported(including_emulation=False):
            precision = "bf16"
        else:
            precision = "fp32" if config.method in SPARSE_METHODS else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision='fp16' needs a CUDA device, not {device.type}: use 'bf16' or 'fp32'.")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def grad_scaler(config: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler an fp16 training needs (see `autocast_dtype`), else None."""
    return torch.amp.GradScaler(device.type) if autocast_dtype(config, device) == torch.float16 else None


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               config: TrainConfig, accelerator: Accelerator, scaler: torch.amp.GradScaler | None = None) -> float:
    """One training step on a collated batch (this process's share of it); returns the batch's mean token loss.

    The loss is the batch's mean token loss across processes; DDP averages gradients, so the local sum is scaled by
    the number of processes. The forward runs under autocast (`autocast_dtype`); `scaler` scales an fp16 step's loss.
    """
    if isinstance(optimizer, SparseMemoryOptimizer):
        positions = counted_positions(batch, config.count_on)
        optimizer.count_at(packed(positions, batch["attention_mask"]) if config.pack else positions)
    device = batch["input_ids"].device
    dtype = autocast_dtype(config, device)
    if dtype == torch.float16 and scaler is None:
        raise ValueError("An fp16 training step needs a loss scaler: pass grad_scaler(config, device).")
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss_sum, n_local = token_loss_sum(model, batch, config.loss_on, config.loss_floor, config.negatives,
                                           config.pack)
        n_tokens = accelerator.reduce(n_local.float(), "sum")
        loss = loss_sum * accelerator.num_processes / n_tokens.clamp_min(1)
        if config.locality and isinstance(optimizer, SparseMemoryOptimizer):
            loss = loss + config.locality * locality_penalty(model, optimizer.background.inputs, LOCALITY_TOKENS,
                                                             optimizer.generator)
    if scaler is None:
        accelerator.backward(loss)
        optimizer.step()
    else:
        accelerator.backward(scaler.scale(loss))
        scaler.step(optimizer)  # skips a step whose gradients overflowed, and lowers the scale
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(loss_sum.detach(), "sum").item() / max(n_tokens.item(), 1)


class Batches:
    """An endless stream of shuffled training batches (each sentence once per pass), this process's share each.

    With `config.negatives`, each sentence that names its subject before the answer brings a negative twin: the
    same sentence about a made-up subject, drawn afresh each time (`augment.told_of_a_stranger`). Given the
    `model` of a sparse method (and `config.reuse_lower_blocks`, without negatives), each sentence carries the
    hidden states that enter the first memory block, computed once here, and batches start there (prefix.py);
    so does full finetuning of the memory blocks' MLPs (`dense_scope`), which trains nothing below them either.
    """

    def __init__(self, facts: Sequence[Fact], tokenizer, config: TrainConfig, accelerator: Accelerator,
                 model: torch.nn.Module | None = None) -> None:
        self.examples = build_examples(facts, tokenizer, config.max_length)
        if not self.examples:
            raise ValueError("No training sentences: give at least one fact with a `train` sentence.")
        above = config.method in SPARSE_METHODS or config.dense_scope == "memory_mlps"  # nothing trained below
        reuse = above and config.reuse_lower_blocks and not config.negatives
        if model is not None and reuse:
            hidden = block_inputs(model, self.examples, first_memory_block(model), pad_id(tokenizer),
                                  autocast_dtype(config, accelerator.device))
            self.examples = [replace(e, hidden=h) for e, h in zip(self.examples, hidden)]
        self.order, self.pool, self.size = random.Random(config.seed), [], config.batch_size
        self.pad_id, self.accelerator = pad_id(tokenizer), accelerator
        self.sentences = [(f, s) for f in facts for s in f.train] if config.negatives else []
        self.taken = " ".join(s for _, s in self.sentences).lower()  # so that no twin names a trained subject
        self.tokenizer, self.max_length = tokenizer, config.max_length
        self.draw = random.Random(config.seed + 1)  # its own, so that the positive batches stay as without negatives

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch, collated on the accelerator's device."""
        if len(self.pool) < self.size:
            fresh = list(range(len(self.examples)))
            self.order.shuffle(fresh)
            self.pool += fresh
        ids, self.pool = self.pool[: self.size], self.pool[self.size:]
        chosen = [self.examples[i] for i in ids] + [twin for i in ids if (twin := self._twin(i))]
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return collate(chosen[rank::world], self.pad_id, self.accelerator.device)

    def _twin(self, i: int) -> Example | None:
        """A negative example for sentence `i`: the sentence about a made-up subject, or None when there is none."""
        if not self.sentences or not (sentence := told_of_a_stranger(*self.sentences[i], self.draw, self.taken)):
            return None
        enc = self.tokenizer(sentence, return_offsets_mapping=True)
        if len(enc["input_ids"]) > self.max_length:
            return None
        return Example(enc["input_ids"], answer_tokens(enc, sentence, self.sentences[i][0].answer), negative=True)


def train(
    model: torch.nn.Module, tokenizer, facts: Sequence[Fact], config: TrainConfig,
    background: SlotStats | None = None, callback: Callable[[int, torch.nn.Module], dict | None] | None = None,
    progress: bool = True, accelerator: Accelerator | None = None,
) -> tuple[torch.nn.Module, History]:
    """Train `model` on the facts' training sentences with the configured method; return (model, history).

    The loop runs under `accelerate`: one process on CPU or GPU, or several (`accelerate launch`), each taking
    its share of every batch; gradients and slot counts are summed across processes, so every process selects
    the same rows. `callback(step, model)` runs after each step; a dict it returns is kept in
    `history.checkpoints`; one with `"stop": True` ends training there. LoRA adapters are merged back into the
    weights at the end.

    Example:
        >>> background = prepare_memory(model, tokenizer, load_background()[:300])
        >>> model, history = train(model, tokenizer, load_facts(limit=20), TrainConfig(steps=100), background)
        >>> fact_recall(model, tokenizer, load_facts(limit=20))
    """
    accelerator = accelerator or Accelerator(cpu=default_device().type == "cpu")
    torch.manual_seed(config.seed)
    model.eval()  # no dropout: these models have none, and the result stays deterministic
    scored = config.method in ("smf_kl", "smf_tfidf")
    if scored and background is not None and background.positions != config.background_on:
        raise ValueError(f"The background was counted at {background.positions!r} positions but the configuration "
                         f"says background_on={config.background_on!r}: count it with collect_background(..., "
                         f"positions={config.background_on!r}) or change the configuration.")
    if config.locality and (background is None or background.inputs is None):
        raise ValueError("The locality term needs background layer inputs: pass the statistics that "
                         "prepare_memory returns (statistics loaded from a file do not keep them).")
    model, optimizer, params_trained = make_optimizer(model, config, background, accelerator)
    model = accelerator.prepare(model)
    batches = Batches(facts, tokenizer, config, accelerator, accelerator.unwrap_model(model))
    config = _packing_checked(config, accelerator.unwrap_model(model), batches)
    scaler = grad_scaler(config, accelerator.device)
    history = History(params_trained=params_trained)
    warmup = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup))
              if config.warmup else None)
    bar = tqdm(range(config.steps), desc=config.method, disable=not (progress and accelerator.is_main_process))
    try:
        for step in bar:
            start = time.perf_counter()
            loss = train_step(model, optimizer, batches.next(), config, accelerator, scaler)
            if warmup is not None:
                warmup.step()
            if isinstance(optimizer, SparseMemoryOptimizer):
                history.selected.append({m.layer_index: len(r) for m, r in zip(optimizer.layers, optimizer.last_rows)})
            history.loss.append(loss)
            history.seconds.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss:.3f}")
            if callback is not None and _checkpoint(history, callback(step + 1, accelerator.unwrap_model(model))):
                break
    finally:
        if isinstance(optimizer, SparseMemoryOptimizer):
            optimizer.detach()
    model = accelerator.unwrap_model(model)
    if config.method == "lora":
        model = model.merge_and_unload()
    model.requires_grad_(False)
    return model, history


def _packing_checked(config: TrainConfig, model: torch.nn.Module, batches: Batches) -> TrainConfig:
    """The configuration, with packing turned off (and a warning) if this model gives packed sentences other
    losses than padded ones: its attention would let them see each other."""
    if not config.pack:
        return config
    if packs_exactly(model, collate(batches.examples[:2], batches.pad_id, batches.accelerator.device)):
        return config
    warnings.warn(f"{type(model).__name__} does not keep packed sentences apart (its attention mask ignores "
                  "position_ids), so training pads each batch instead, which is slower; TrainConfig(pack=False) "
                  "says so without this check.", stacklevel=3)
    return replace(config, pack=False)


def _checkpoint(history: History, result: dict | None) -> bool:
    """Keep what a callback returned (without its "stop" flag); return whether it asked to stop."""
    result = dict(result or {})
    stop = result.pop("stop", False)
    if result:
        history.checkpoints.append({"step": len(history.loss), **result})
    return bool(stop)
