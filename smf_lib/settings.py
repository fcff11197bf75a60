"""The notebooks' settings: one small object chosen from the environment, printed in each notebook's settings cell.

- ``SMF_PROFILE``: ``tiny``, ``cpu`` or ``gpu`` (default: ``gpu`` when CUDA is available, else ``cpu``);
- ``SMF_FAST=1``: smaller sizes (fewer texts and facts) for continuous integration. It never changes the model:
  a fast run of the ``cpu`` profile still uses the real SmolLM2-135M.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from .models import PROFILES, default_profile


@dataclass(frozen=True)
class NotebookSettings:
    """What a notebook runs on and how much data it uses."""

    profile: str
    model_name: str
    device: str
    fast: bool
    seed: int
    n_background_texts: int  # background passages for slot statistics (and for calibrating queries)
    n_heldout_texts: int     # held-out paragraphs for perplexity
    n_facts: int             # new facts loaded (e.g. for the slot inspector)
    n_batch_facts: int       # new facts whose training sentences form one scored batch
    top_t: int               # slots kept per layer and batch

    def __str__(self) -> str:
        size = "fast (reduced sizes)" if self.fast else "full"
        return (f"profile {self.profile!r}: model {self.model_name!r} on {self.device}, {size}; "
                f"{self.n_background_texts} background texts, {self.n_heldout_texts} held-out texts, "
                f"{self.n_facts} new facts ({self.n_batch_facts} per scored batch), top-t {self.top_t}")


# (n_background_texts, n_heldout_texts, n_facts, n_batch_facts, top_t)
_FULL_SIZES = {
    "tiny": (48, 8, 12, 4, 2000),
    "cpu": (300, 40, 60, 4, 2000),
    "gpu": (600, 80, 240, 4, 2000),
}
_FAST_SIZES = (32, 8, 4, 4, 2000)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def notebook_settings(profile: str | None = None, fast: bool | None = None, seed: int = 0) -> NotebookSettings:
    """Settings from the arguments, else from ``SMF_PROFILE`` / ``SMF_FAST``, else the defaults."""
    profile = profile or os.environ.get("SMF_PROFILE", "").strip() or default_profile()
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r} (from SMF_PROFILE?); choose one of {', '.join(PROFILES)}.")
    fast = _flag("SMF_FAST") if fast is None else fast
    sizes = _FAST_SIZES if fast else _FULL_SIZES[profile]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return NotebookSettings(profile, PROFILES[profile], device, fast, seed, *sizes)


def in_colab() -> bool:
    """Whether this runs inside Google Colab."""
    return "google.colab" in sys.modules
