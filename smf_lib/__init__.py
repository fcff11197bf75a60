"""smf_lib: sparse memory finetuning. Retrofit product-key memory layers into a pretrained causal LM, find the slots
that new facts read surprisingly often, and train only those rows.

The pipeline, in the order a user meets it: `load_base_model` → `prepare_memory` (`retrofit`, query calibration,
background statistics) → `train` (or `SparseMemoryOptimizer` in any training loop) → evaluation → `save_memory`.
Figures (`smf_lib.plots`, `smf_lib.training_plots`), widgets (`smf_lib.widgets`) and the benchmark
(`smf_lib.bench`) are imported on their own, so that `import smf_lib` stays light.
"""

from importlib.metadata import PackageNotFoundError, version

from .analysis import changed_rows, gate_openness, layer_attribution, parameter_changes, snapshot
from .data import (
    DataFormatError,
    Fact,
    KnownFact,
    load_background,
    load_facts,
    load_heldout_text,
    load_known_facts,
)
from .evaluation import complete, contains_answer, fact_recall, known_correct, paraphrase_recall, perplexity
from .gates import fit_gates
from .healing import HealConfig, heal
from .memory import ProductKeyMemory, SlotAccess
from .models import ModelNotAvailableError, load_base_model
from .optim import RowAdam, RowSGD, SparseMemoryOptimizer
from .patches import (
    MemoryPatch,
    PatchError,
    apply_patch,
    load_patch,
    lock_patch,
    merge_patches,
    quantize_patch,
    revert_patch,
    save_patch,
)
from .pipeline import prepare_memory
from .profiles import PROFILES, Profile, get_profile
from .retrofit import MemoryConfig, RetrofitError, load_memory, memory_layers, retrofit, save_memory
from .selection import kl_scores, select_top, tfidf_scores, token_surprise
from .stats import SlotStats, collect_background, recording, slot_counts
from .training import METHODS, TrainConfig, train

try:
    __version__ = version("smf_lib")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# Where the project lives: the notebooks' Colab setup cells clone it and the "Open in Colab" badges point into it
# (tests/test_colab.py checks that they all use this URL).
REPOSITORY = "https://github.com/smf-lib/smf_lib"

__all__ = [
    "__version__", "REPOSITORY",
    # models and memory
    "load_base_model", "ModelNotAvailableError", "ProductKeyMemory", "SlotAccess",
    "MemoryConfig", "RetrofitError", "retrofit", "memory_layers", "save_memory", "load_memory",
    # profiles and the pipeline to a model ready for sparse training
    "Profile", "PROFILES", "get_profile", "prepare_memory", "heal", "HealConfig", "fit_gates",
    # slot statistics and selection
    "SlotStats", "collect_background", "recording", "slot_counts",
    "kl_scores", "tfidf_scores", "select_top", "token_surprise",
    # training
    "TrainConfig", "train", "METHODS", "SparseMemoryOptimizer", "RowAdam", "RowSGD",
    # data
    "Fact", "KnownFact", "DataFormatError", "load_facts", "load_known_facts", "load_background", "load_heldout_text",
    # evaluation and analysis
    "complete", "contains_answer", "fact_recall", "paraphrase_recall", "known_correct", "perplexity",
    "snapshot", "parameter_changes", "changed_rows", "layer_attribution", "gate_openness",
    # memory patches: a trained fact set as a file to apply, revert and merge
    "MemoryPatch", "PatchError", "save_patch", "load_patch", "apply_patch", "revert_patch", "merge_patches",
    "lock_patch", "quantize_patch",
]
