"""Every per-profile setting in one place: the model, its memory, the run's sizes and the notebooks' sizes.

A profile is a frozen value: change one with `dataclasses.replace` and pass it on, e.g.
`prepare(replace(get_profile("cpu"), memory=MemoryConfig(layers=(12, 18))))`; nothing here is mutated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .healing import HealConfig
from .models import QWEN, SMOLLM2, TINY, default_device
from .retrofit import MemoryConfig
from .training import TrainConfig


@dataclass(frozen=True)
class RunSizes:
    """Sizes of `run`, `tune` and `stream`: facts and texts, step budgets, checkpoints and the learning rates tried.

    `run` trains each method on the first `n_facts` test facts (None: all) until fact recall reaches
    `target_recall` or `max_steps` run out, evaluated every `eval_every` steps. `tune` tries every rate of
    `lr_grid` on the first `tune_facts` tune facts within `tune_steps` (a method's `replace_lr_grid` instead, in
    replace mode). `stream` teaches `facts_per_round` facts in each round. `None` for a text or known-fact count
    means all.
    """

    n_facts: int | None
    max_steps: int
    eval_every: int
    tune_facts: int
    tune_steps: int
    lr_grid: dict[str, tuple[float, ...]]
    target_recall: float = 0.9
    n_background: int | None = None
    n_heldout: int | None = None
    n_known: int | None = None  # known facts scored (a smoke run's budget; reported runs use all)
    augment: int = 0  # wordings added per fact to its training sentences (`run --augment N`, augment.py)
    facts_per_round: int | None = None  # `stream`'s facts per round (None: the split's facts shared out)
    replace_lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)  # rates tried in replace mode


@dataclass(frozen=True)
class NotebookSizes:
    """How much data the notebooks use."""

    n_background_texts: int  # background passages for slot statistics (and for calibrating queries)
    n_heldout_texts: int     # held-out paragraphs for perplexity
    n_facts: int             # new facts loaded (e.g. for the slot inspector)
    n_batch_facts: int       # new facts whose training sentences form one scored batch


@dataclass(frozen=True)
class Profile:
    """A model and everything sized for it: the memory, the training defaults, the run and the notebooks."""

    name: str
    model: str
    memory: MemoryConfig
    train: TrainConfig
    run: RunSizes
    notebook: NotebookSizes
    notebook_fast: NotebookSizes = NotebookSizes(32, 8, 4, 4)  # SMF_FAST=1: continuous integration
    heal: HealConfig = HealConfig()  # healing a replace-mode memory (`run --mode replace`)

    def notebook_sizes(self, fast: bool) -> NotebookSizes:
        """The notebooks' sizes, reduced in fast mode (the model stays the same)."""
        return self.notebook_fast if fast else self.notebook


# Three rates over a factor of 10 for every method, chosen on the tune split by `python -m smf_lib tune`.
LR_GRID = {"smf_kl": (1.0, 3.0, 10.0), "smf_tfidf": (1.0, 3.0, 10.0), "full_ft": (1e-5, 3e-5, 1e-4),
           "lora": (1e-4, 3e-4, 1e-3)}

# In replace mode the memory's value rows hold the healed MLP's function, not zeros: a step the size of the
# additive rates rewrites them (lr 3.0 took perplexity up a thousandfold, docs/RESULTS.md), so smaller ones.
REPLACE_LR_GRID = {"smf_kl": (0.01, 0.03, 0.1, 0.3), "smf_tfidf": (0.01, 0.03, 0.1, 0.3)}

PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        "tiny", TINY, MemoryConfig(layers=(1, 3), n_keys=16, topk=4, key_dim=32), TrainConfig(),
        RunSizes(n_facts=6, max_steps=6, eval_every=3, tune_facts=4, tune_steps=4, n_background=24, n_heldout=8,
                 lr_grid={"smf_kl": (0.3, 3.0), "smf_tfidf": (0.3,), "full_ft": (1e-2,), "lora": (1e-2,)}),
        NotebookSizes(48, 8, 12, 4), heal=HealConfig(steps=20, batch_tokens=256, written=8, written_tokens=16)),
    "cpu": Profile(
        "cpu", SMOLLM2, MemoryConfig(), TrainConfig(batch_size=16),
        RunSizes(n_facts=None, max_steps=300, eval_every=30, tune_facts=48, tune_steps=150, lr_grid=LR_GRID,
                 replace_lr_grid=REPLACE_LR_GRID, facts_per_round=20),
        NotebookSizes(300, 40, 60, 4)),
    "gpu": Profile(
        "gpu", QWEN, MemoryConfig(), TrainConfig(batch_size=16),
        RunSizes(n_facts=None, max_steps=300, eval_every=25, tune_facts=105, tune_steps=300, lr_grid=LR_GRID,
                 replace_lr_grid=REPLACE_LR_GRID),
        NotebookSizes(600, 80, 240, 4)),
}


def default_profile() -> str:
    """The `gpu` profile when CUDA is available, else `cpu`."""
    return "gpu" if default_device().type == "cuda" else "cpu"


def get_profile(profile: str | Profile | None = None) -> Profile:
    """The named profile (a Profile passes through; `None`: the default profile)."""
    if isinstance(profile, Profile):
        return profile
    name = profile or default_profile()
    if name not in PROFILES:
        raise ValueError(f"Unknown profile {name!r}; choose one of {', '.join(PROFILES)}.")
    return PROFILES[name]


@dataclass(frozen=True)
class NotebookSettings:
    """What a notebook runs on: its profile, device, fast mode and seed."""

    profile: Profile
    device: str
    fast: bool
    seed: int

    @property
    def sizes(self) -> NotebookSizes:
        """The data sizes for this mode."""
        return self.profile.notebook_sizes(self.fast)

    def __str__(self) -> str:
        s, size = self.sizes, "fast (reduced sizes)" if self.fast else "full"
        return (f"profile {self.profile.name!r}: model {self.profile.model!r} on {self.device}, {size}; "
                f"{s.n_background_texts} background texts, {s.n_heldout_texts} held-out texts, "
                f"{s.n_facts} new facts ({s.n_batch_facts} per scored batch), top-t {self.profile.train.top_t}")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def notebook_settings(profile: str | None = None, fast: bool | None = None, seed: int = 0) -> NotebookSettings:
    """Settings from the arguments, else from `SMF_PROFILE` / `SMF_FAST=1`, else the defaults."""
    chosen = get_profile(profile or os.environ.get("SMF_PROFILE", "").strip() or None)
    fast = _flag("SMF_FAST") if fast is None else fast
    return NotebookSettings(chosen, default_device().type, fast, seed)
