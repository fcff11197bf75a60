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
from pathlib import Path

from .data import DATA_DIR
from .experiment import DEFAULT_METHODS, MATCHED_KEYS, at_matched_recall, prepare, train_method
from .files import write_json
from .profiles import Profile, get_profile
from .training import DEFAULT_LR, DENSE_METHODS


def candidates(profile: Profile, method: str) -> list[dict]:
    """The settings tried for a method: the profile's learning rates, and for the dense baselines also the loss on
    the answer tokens only (it may forget less than the loss on every token)."""
    losses = ("all", "answer") if method in DENSE_METHODS else (profile.train.loss_on,)
    rates = profile.run.lr_grid.get(method, (DEFAULT_LR[method],))
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
         out: str | Path | bool | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Try every candidate of every method on the tune split; write the choices and the table they came from to
    `out` (default `data/tuned-<profile>.json`; False: do not write) and return them."""
    profile = get_profile(profile)
    setup = prepare(profile, split="tune", seed=seed, augment=profile.run.augment, progress=progress)
    target, rows = profile.run.target_recall, []
    for method in methods:
        for hyper in candidates(profile, method):
            run = train_method(setup, method, hyper, max_steps=profile.run.tune_steps, seed=seed, progress=progress)
            rows.append(_row(method, hyper, run.checkpoints, run.steps, target))
            del run
    chosen = {m: choose([r for r in rows if r["method"] == m]) for m in methods}
    result = {"profile": profile.name, "date": datetime.date.today().isoformat(),
              "command": f"python -m smf_lib tune --profile {profile.name} --methods {','.join(methods)}",
              "target_recall": target, "tune_fact_ids": [f.id for f in setup.facts],
              "tune_known": len(setup.known), "max_steps": profile.run.tune_steps, "augment": profile.run.augment,
              "methods": {m: {k: r[k] for k in ("lr", "loss_on")} for m, r in chosen.items()}, "table": rows}
    if out is not False:
        write_json(Path(out) if out else tuned_path(profile), result)
    return result


def tuned_path(profile: Profile) -> Path:
    """Where a profile's tuned settings are kept: `data/tuned-<profile>.json`."""
    return DATA_DIR / f"tuned-{profile.name}.json"


def tuned_settings(profile: Profile, methods: Sequence[str], path: str | Path | None = None,
                   progress: bool = True) -> tuple[dict[str, dict], dict]:
    """Each method's settings from the tuned file (or tuned now, in memory, for the methods it lacks), and where
    they came from: `{"source", "tune_fact_ids", "tune_known"}`."""
    path = Path(path) if path else tuned_path(profile)
    saved = json.loads(path.read_text()) if path.exists() else {"methods": {}}
    if path.exists() and (saved.get("profile"), saved.get("target_recall")) != (profile.name,
                                                                                 profile.run.target_recall):
        raise ValueError(f"{path} holds settings tuned for profile {saved.get('profile')!r} at recall "
                         f"{saved.get('target_recall')}, not {profile.name!r} at {profile.run.target_recall}: "
                         f"run python -m smf_lib tune --profile {profile.name}.")
    missing = [m for m in methods if m not in saved["methods"]]
    if not missing:
        info = {"source": str(path), **{k: saved.get(k) for k in ("tune_fact_ids", "tune_known")}}
        return {m: saved["methods"][m] for m in methods}, info
    print(f"No tuned settings for {', '.join(missing)} in {path}: tuning them first on the tune split "
          f"(python -m smf_lib tune --profile {profile.name}).", file=sys.stderr)
    tuned = tune(profile, missing, out=False, progress=progress)
    chosen = {**saved["methods"], **tuned["methods"]}
    source = "tuned in this run on the tune split" + (f" (the others from {path})" if len(missing) < len(methods)
                                                      else "")
    info = {"source": source, "tune_fact_ids": tuned["tune_fact_ids"], "tune_known": tuned["tune_known"]}
    return {m: chosen[m] for m in methods}, info
