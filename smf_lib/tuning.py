"""Choosing each method's settings on the tune split (`python -m smf_lib tune`), the same way for every method.

Every candidate trains on the tune facts until fact recall reaches the target (or its budget runs out). Among the
candidates that reach it, the one that forgets least at matched recall wins: the smaller known-fact drop, then the
smaller perplexity change. When none reaches it, the best recall wins. Test facts are never loaded here.
"""

from __future__ import annotations

import datetime
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .data import DATA_DIR
from .experiment import DEFAULT_METHODS, prepare, train_method
from .files import write_json
from .profiles import Profile, get_profile
from .report import MATCHED_KEYS, at_matched_recall
from .training import DEFAULT_LR, DENSE_METHODS, LOSS_ON


def candidates(profile: Profile, method: str, mode: str = "additive") -> list[dict]:
    """The settings tried for a method: the profile's learning rates (for the memory's `mode`), and for the dense
    baselines every loss of `LOSS_ON` (every token, all but the subject's, the answer's alone), since which
    forgets least differs between them."""
    losses = LOSS_ON if method in DENSE_METHODS else (profile.train.loss_on,)
    grid = {**profile.run.lr_grid, **(profile.run.replace_lr_grid if mode == "replace" else {})}
    rates = grid.get(method, (DEFAULT_LR[method],))
    return [{"lr": lr, "loss_on": loss} for lr, loss in itertools.product(rates, losses)]


def _row(method: str, hyper: dict, checkpoints: list[dict], steps: int, target: float) -> dict:
    """A candidate's line of the table: forgetting at matched recall, else at its last checkpoint."""
    matched = at_matched_recall(checkpoints, target)
    where = matched or checkpoints[-1]
    return {"method": method, **hyper, "reached": matched is not None, "steps": steps,
            "fact_recall": checkpoints[-1]["fact_recall"], **{k: where[k] for k in MATCHED_KEYS if k in where}}


def choose(rows: Sequence[dict]) -> dict:
    """The winning row: reached the target forgetting least (known facts, then perplexity), else the best recall."""
    reached = [r for r in rows if r["reached"]]
    if reached:
        return min(reached, key=lambda r: (round(r["known_fact_drop_pct"], 6), r["ppl_increase_pct"]))
    return max(rows, key=lambda r: (r["fact_recall"], -r["ppl_increase_pct"]))


def tune(profile: str | Profile | None = None, methods: Sequence[str] = DEFAULT_METHODS,
         out: str | Path | bool | None = None, seed: int = 0, progress: bool = True, mode: str | None = None) -> dict:
    """Try every candidate of every method on the tune split, with the memory in `mode` (default: the profile's;
    replace mode heals it first); write the choices and the table they came from to `out` (default
    `tuned_path(profile, mode)`; False: do not write) and return them."""
    profile = get_profile(profile)
    mode = mode or profile.memory.mode
    setup = prepare(profile, split="tune", seed=seed, memory=replace(profile.memory, mode=mode),
                    augment=profile.run.augment, progress=progress)
    target, rows = profile.run.target_recall, []
    for method in methods:
        for hyper in candidates(profile, method, mode):
            run = train_method(setup, method, hyper, max_steps=profile.run.tune_steps, seed=seed, progress=progress)
            rows.append(_row(method, hyper, run.checkpoints, run.steps, target))
            del run
    chosen = {m: choose([r for r in rows if r["method"] == m]) for m in methods}
    result = {"profile": profile.name, "date": datetime.date.today().isoformat(),
              "command": tune_command(profile, mode, methods),
              "mode": mode, "target_recall": target, "tune_fact_ids": [f.id for f in setup.facts],
              "tune_known": len(setup.known), "max_steps": profile.run.tune_steps, "augment": profile.run.augment,
              "methods": {m: {k: r[k] for k in ("lr", "loss_on")} for m, r in chosen.items()}, "table": rows}
    if out is not False:
        write_json(Path(out) if out else tuned_path(profile, mode), result)
    return result


def tune_command(profile: Profile, mode: str, methods: Sequence[str] = ()) -> str:
    """The command that tunes this profile's settings (of `methods`, default all) for the memory in `mode`."""
    return (f"python -m smf_lib tune --profile {profile.name}" + (f" --methods {','.join(methods)}" if methods else "")
            + (" --mode replace" if mode == "replace" else ""))


def tuned_path(profile: Profile, mode: str | None = None) -> Path:
    """Where a profile's tuned settings are kept: `data/tuned-<profile>.json`, `data/tuned-<profile>-replace.json`
    for the memory in replace mode."""
    suffix = "-replace" if (mode or profile.memory.mode) == "replace" else ""
    return DATA_DIR / f"tuned-{profile.name}{suffix}.json"


def tuned_settings(profile: Profile, methods: Sequence[str], path: str | Path | None = None,
                   progress: bool = True, mode: str | None = None) -> tuple[dict[str, dict], dict]:
    """Each method's settings from the tuned file for the memory's `mode` (or tuned now, in memory, for the methods
    it lacks), and where they came from: `{"source", "tune_fact_ids", "tune_known"}`."""
    mode = mode or profile.memory.mode
    path = Path(path) if path else tuned_path(profile, mode)
    saved = json.loads(path.read_text()) if path.exists() else {"methods": {}}
    found = (saved.get("profile"), saved.get("target_recall"), saved.get("mode", "additive"))
    if path.exists() and found != (profile.name, profile.run.target_recall, mode):
        raise ValueError(f"{path} holds settings tuned for profile {found[0]!r} at recall {found[1]} in "
                         f"{found[2]} mode, not {profile.name!r} at {profile.run.target_recall} in {mode} mode: "
                         f"run {tune_command(profile, mode)}.")
    missing = [m for m in methods if m not in saved["methods"]]
    if not missing:
        info = {"source": str(path), **{k: saved.get(k) for k in ("tune_fact_ids", "tune_known")}}
        return {m: saved["methods"][m] for m in methods}, info
    print(f"No tuned settings for {', '.join(missing)} in {path}: tuning them first on the tune split "
          f"({tune_command(profile, mode)}).", file=sys.stderr)
    tuned = tune(profile, missing, out=False, progress=progress, mode=mode)
    chosen = {**saved["methods"], **tuned["methods"]}
    source = "tuned in this run on the tune split" + (f" (the others from {path})" if len(missing) < len(methods)
                                                      else "")
    info = {"source": source, "tune_fact_ids": tuned["tune_fact_ids"], "tune_known": tuned["tune_known"]}
    return {m: chosen[m] for m in methods}, info
