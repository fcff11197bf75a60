"""From a base model to one ready for sparse training: retrofit, calibrate the queries, count background slot use."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .calibration import answer_contexts, calibrate_keys, calibrate_queries, discriminant_directions
from .data import Fact
from .healing import HealConfig, heal
from .retrofit import MemoryConfig, retrofit
from .stats import SlotStats, collect_background, layer_inputs


def prepare_memory(model: torch.nn.Module, tokenizer, texts: Sequence[str], config: MemoryConfig | None = None,
                   progress: bool = True, heal_config: HealConfig | None = None,
                   background_on: str = "all", practice: Sequence[Fact] = ()) -> SlotStats:
    """Retrofit `model` in place, calibrate its queries on `texts` and return the background slot statistics.

    The fresh memory adds nothing (its values are zero), so its layers' inputs do not depend on its queries: one
    pass over `texts` serves both the calibration and the statistics. `config.seed` seeds the keys and queries.
    In replace mode the memory is first healed on `texts` (`healing.heal`, with `heal_config`), then counted on the
    healed model. `background_on` says which tokens are counted (`collect_background`'s `positions`). With
    `config.query_rank` the queries see only the directions that tell the `practice` facts apart (never the facts
    to be taught: `gates.practice_facts`).

    Example:
        >>> model, tokenizer = load_base_model("smollm2-135m")
        >>> background = prepare_memory(model, tokenizer, load_background()[:300])
        >>> model, history = train(model, tokenizer, facts, TrainConfig(), background=background)
    """
    config = config or MemoryConfig()
    retrofit(model, config)
    if config.mode == "replace":  # the model is broken until the memory does the replaced MLPs' work
        heal(model, tokenizer, texts, heal_config or HealConfig(seed=config.seed), progress)
        return collect_background(model, tokenizer, texts, progress=progress, positions=background_on)
    inputs = layer_inputs(model, tokenizer, texts, progress=progress)
    directions = None
    if config.query_rank:
        if not practice:
            raise ValueError("MemoryConfig.query_rank needs practice facts: pass practice=practice_facts(taught).")
        contexts, owner = answer_contexts(model, tokenizer, practice)
        directions = {i: discriminant_directions(inputs.x[i], c, owner, config.query_rank)
                      for i, c in contexts.items()}
    calibrate_queries(model, tokenizer, texts, seed=config.seed, inputs=inputs, directions=directions)
    if config.key_init == "kmeans":
        calibrate_keys(model, inputs, seed=config.seed)
    return collect_background(model, tokenizer, texts, inputs=inputs, positions=background_on)
