"""Training on new facts: sparse memory finetuning (KL, TF-IDF, random slots) and the dense baselines."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .data import Fact
from .evaluation import next_token_losses
from .optim import RowAdam, RowSGD
from .retrofit import memory_layers
from .selection import kl_scores, random_scores, select_top, tfidf_scores
from .stats import SlotStats, recording, slot_counts

SPARSE_METHODS = ("smf_kl", "smf_tfidf", "smf_random")
DENSE_METHODS = ("full_ft", "lora")
METHODS = SPARSE_METHODS + DENSE_METHODS
DEFAULT_LR = {"smf_kl": 0.3, "smf_tfidf": 0.3, "smf_random": 0.3, "full_ft": 3e-5, "lora": 3e-4}


@dataclass
class TrainConfig:
    """How to train. `lr=None` takes the method's default (DEFAULT_LR)."""

    method: str = "smf_kl"
    steps: int = 100
    batch_size: int = 8
    lr: float | None = None
    optimizer: str = "adam"          # sparse methods: "adam" (row-wise Adam/AdamW) or "sgd"
    weight_decay: float = 0.0
    top_t: int = 500                 # value rows per memory layer per step
    loss_on: str = "all"             # "all": loss on every token; "answer": on the answer tokens only
    count_on: str = "answer"         # slots counted at the positions predicting the answer, or at "all"
    lora_rank: int = 16
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.optimizer not in ("adam", "sgd") or self.loss_on not in ("answer", "all") or self.count_on not in ("answer", "all"):
            raise ValueError("optimizer must be 'adam' or 'sgd'; loss_on and count_on must be 'answer' or 'all'.")
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


@dataclass
class Example:
    """One tokenised training sentence with the mask of its answer tokens."""

    input_ids: list[int]
    answer_mask: list[bool]


def build_examples(facts: Sequence[Fact], tokenizer, max_length: int = 64) -> list[Example]:
    """Tokenise every training sentence; mark the tokens that overlap the answer's last occurrence."""
    examples = []
    for fact in facts:
        for sentence in fact.train:
            enc = tokenizer(sentence, return_offsets_mapping=True, truncation=True, max_length=max_length)
            start = sentence.rindex(fact.answer)
            end = start + len(fact.answer)
            mask = [s < end and e > start for s, e in enc["offset_mapping"]]
            examples.append(Example(enc["input_ids"], mask))
    return examples


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a batch; `targets` marks the positions whose next token is trained on."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids, dtype=torch.bool)
    answer = torch.zeros_like(attention)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[row, : len(e.input_ids)] = True
        answer[row, : len(e.answer_mask)] = torch.tensor(e.answer_mask)
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "answer": answer.to(device)}


def predicting(targets: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is marked in `targets` (batch x seq, bool)."""
    out = torch.zeros_like(targets)
    out[:, :-1] = targets[:, 1:]
    return out


def counted_positions(batch: dict[str, torch.Tensor], count_on: str) -> torch.Tensor:
    """The positions whose slot reads are counted: those predicting an answer token, or every real token."""
    return predicting(batch["answer"]) if count_on == "answer" else batch["attention_mask"]


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_on: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over the trained tokens, and how many tokens that is."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    trained = predicting(batch["answer"] if loss_on == "answer" else batch["attention_mask"])
    return (next_token_losses(logits, batch["input_ids"]) * trained).sum(), trained.sum()


class SparseUpdate:
    """Chooses the value rows to update from the batch's slot counts, then updates only them."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, background: SlotStats | None) -> None:
        if config.method != "smf_random" and background is None:
            raise ValueError(f"{config.method} needs background statistics: pass background=collect_background(...).")
        self.layers, self.config, self.background = memory_layers(model), config, background
        if not self.layers:
            raise ValueError("Sparse memory finetuning needs a retrofitted model: call retrofit(model) first.")
        tables = [m.values.weight for m in self.layers]
        for p in model.parameters():
            p.requires_grad_(False)
        for t in tables:
            t.requires_grad_(True)
        opt = RowAdam if config.optimizer == "adam" else RowSGD
        kwargs = {"weight_decay": config.weight_decay} if config.optimizer == "adam" else {}
        self.optimizer = opt(tables, config.lr, **kwargs)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.params_trained = sum(t.numel() for t in tables)

    def scores(self, layer: int, counts: torch.Tensor) -> torch.Tensor:
        """The slot scores of the configured method for one layer."""
        if self.config.method == "smf_kl":
            return kl_scores(counts, self.background.counts[layer].to(counts.device))
        if self.config.method == "smf_tfidf":
            bg = self.background
            return tfidf_scores(counts, bg.doc_freq[layer].to(counts.device), bg.n_batches)
        return random_scores(counts.cpu(), self.generator).to(counts.device)

    def rows(self, counts: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Top-t rows per layer for this step."""
        return [select_top(self.scores(m.layer_index, counts[m.layer_index]), self.config.top_t) for m in self.layers]


def _prepare_dense(model: torch.nn.Module, config: TrainConfig):
    """Set up full finetuning or LoRA; return (model, optimizer, trained parameter count)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        memory_names = {n for n, m in model.named_modules() if m in set(memory_layers(model))}
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and not any(n.startswith(mn) for mn in memory_names) and not n.endswith("lm_head")]
        model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                                 lora_dropout=0.0, target_modules=targets))
    else:
        memory = {id(p) for m in memory_layers(model) for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) not in memory)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one pass over each tensor instead of a dozen elementwise ops (CPU and CUDA both have the kernel)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    return model, optimizer, sum(p.numel() for p in params)


def train(
    model: torch.nn.Module, tokenizer, facts: Sequence[Fact], config: TrainConfig,
    background: SlotStats | None = None, callback: Callable[[int, torch.nn.Module], dict | None] | None = None,
    progress: bool = True, accelerator: Accelerator | None = None,
) -> tuple[torch.nn.Module, History]:
    """Train `model` on the facts' training sentences with the configured method; return (model, history).

    The loop runs under `accelerate`: one process on CPU or GPU, or several (`accelerate launch`), each taking
    its share of every batch; gradients and slot counts are summed across processes, so every process selects
    the same rows. `callback(step, model)` runs after each step; a dict it returns is kept in
    `history.checkpoints`; one with `"stop": True` ends training there. LoRA adapters are merged back into the weights at the end.
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(config.seed)
    model.eval()  # no dropout: these models have none, and the result stays deterministic
    sparse = config.method in SPARSE_METHODS
    if sparse:
        update = SparseUpdate(model, config, background)
        params_trained = update.params_trained
    else:
        model, optimizer, params_trained = _prepare_dense(model, config)
    model = accelerator.prepare(model)
    examples = build_examples(facts, tokenizer, config.max_length)
    if not examples:
        raise ValueError("No training sentences: give at least one fact with a `train` sentence.")
    order = random.Random(config.seed)
    pool: list[int] = []
    history = History(params_trained=params_trained)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(range(config.steps), desc=config.method, disable=not (progress and accelerator.is_main_process))
    for step in bar:
        start = time.perf_counter()
        if len(pool) < config.batch_size:
            fresh = list(range(len(examples)))
            order.shuffle(fresh)
            pool += fresh
        batch_ids, pool = pool[: config.batch_size], pool[config.batch_size:]
        batch = collate([examples[i] for i in batch_ids[rank::world]], pad_id, accelerator.device)
        with recording(model, enabled=sparse):
            loss_sum, n_local = token_loss_sum(model, batch, config.loss_on)
            n_tokens = accelerator.reduce(n_local.float(), "sum")
            # DDP averages gradients over processes: scale so the result is the mean over the whole batch.
            accelerator.backward(loss_sum * world / n_tokens.clamp_min(1))
            if sparse:
                where = counted_positions(batch, config.count_on)
                counts = {i: accelerator.reduce(c, "sum") for i, c in slot_counts(model, where).items()}
        if sparse:
            rows = update.rows(counts)
            update.optimizer.step(rows)
            history.selected.append({m.layer_index: len(r) for m, r in zip(update.layers, rows)})
            for m in update.layers:
                m.values.weight.grad = None
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = accelerator.reduce(loss_sum.detach(), "sum").item() / max(n_tokens.item(), 1)
        history.loss.append(loss)
        history.seconds.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss:.3f}")
        if callback is not None:
            result = dict(callback(step + 1, accelerator.unwrap_model(model)) or {})
            stop = result.pop("stop", False)
            if result:
                history.checkpoints.append({"step": step + 1, **result})
            if stop:
                break
    model = accelerator.unwrap_model(model)
    if config.method == "lora":
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, history
