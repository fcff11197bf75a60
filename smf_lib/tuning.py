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
from .experiment import at_matched_recall, prepare, train_method
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
    matched = at_matched_recall(checkpoints, target)
    last = checkpoints[-1]
    where = matched or {k: last[k] for k in ("paraphrase_recall", "ppl_increase_pct", "known_fact_drop_pct")}
    return {"method": method, **hyper, "reached": matched is not None, "steps": steps,
            "fact_recall": last["fact_recall"], **{k: where[k] for k in
                                                   ("paraphrase_recall", "ppl_increase_pct", "known_fact_drop_pct")}}


def choose(rows: Sequence[dict]) -> dict:
    """The winning row: reached the target forgetting least (known facts, then perplexity), else the best recall."""
    reached = [r for r in rows if r["reached"]]
    if reached:
        return min(reached, key=lambda r: (round(r["known_fact_drop_pct"], 6), r["ppl_increase_pct"]))
    return max(rows, key=lambda r: (r["fact_recall"], -r["ppl_increase_pct"]))


def tune(profile: str | Profile | None = None, methods: Sequence[str] = ("smf_kl", "smf_tfidf", "full_ft", "lora"),
         out: str | Path | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Try every candidate of every method on the tune split; write the choices and the table they came from."""
    profile = get_profile(profile)
    setup = prepare(profile, split="tune", seed=seed, progress=progress)
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
              "tune_known": len(setup.known), "max_steps": profile.run.tune_steps,
              "methods": {m: {k: r[k] for k in ("lr", "loss_on")} for m, r in chosen.items()}, "table": rows}
    if out is not False:
        write_json(Path(out) if out else tuned_path(profile), result)
    return result


def tuned_path(profile: Profile) -> Path:
    """Where a profile's tuned settings are kept: `data/tuned-<profile>.json`."""
    return DATA_DIR / f"tuned-{profile.name}.json"


def tuned_settings(profile: Profile, methods: Sequence[str], path: str | Path | None = None,
                   progress: bool = True) -> tuple[dict[str, dict], str]:
    """Each method's settings from the tuned file (or tuned now, in memory, when the profile has none); and where
    they came from."""
    path = Path(path) if path else tuned_path(profile)
    if path.exists():
        chosen = json.loads(path.read_text())["methods"]
        missing = [m for m in methods if m not in chosen]
        if not missing:
            return {m: chosen[m] for m in methods}, str(path)
        print(f"{path} has no settings for {', '.join(missing)}: tuning them now on the tune split.", file=sys.stderr)
    else:
        missing = list(methods)
        print(f"No tuned settings at {path}: tuning on the tune split first (python -m smf_lib tune).",
              file=sys.stderr)
    tuned = tune(profile, missing, out=False, progress=progress)["methods"]
    chosen = {**(json.loads(path.read_text())["methods"] if path.exists() else {}), **tuned}
    return {m: chosen[m] for m in methods}, "tuned in this run on the tune split"
