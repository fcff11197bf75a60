"""`make figures`: the key figures, redrawn from measured results into docs/figures/ for readers who run nothing.

    python -m smf_lib.figures [--profile cpu] [--results results] [--out docs/figures]

Each figure is drawn from the result files that `run`, `stream` and the ablations wrote; a figure whose results are
missing is skipped with a note saying which command makes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

from .ablation import load_variants, plot_ablations
from .files import save_figure
from .report import plot_pareto
from .stream_report import plot_stream


def make_figures(profile: str = "cpu", results: str | Path = "results",
                 out: str | Path = Path("docs") / "figures") -> dict[str, Path | str]:
    """Redraw every figure whose results exist; return, per figure, its path or why it was skipped."""
    results, out = Path(results), Path(out)
    sources = {
        f"pareto-{profile}.png": (results / profile / "summary.json", plot_pareto,
                                  f"python -m smf_lib run --profile {profile}"),
        f"stream-{profile}.png": (results / f"stream-{profile}" / "summary.json", plot_stream,
                                  f"python -m smf_lib stream --profile {profile}"),
    }
    variants = load_variants(results / "ablation" / profile)
    made: dict[str, Path | str] = {}
    for name, (source, plot, command) in sources.items():
        made[name] = (_save(plot(json.loads(source.read_text())), out / name) if source.exists()
                      else f"skipped: no {source} (made by `{command}`)")
    made[f"ablations-{profile}.png"] = (_save(plot_ablations(variants), out / f"ablations-{profile}.png")
                                        if variants else f"skipped: no results in {results / 'ablation' / profile} "
                                        "(made by `python -m smf_lib.ablation`)")
    return made


def _save(figure: plt.Figure, path: Path) -> Path:
    save_figure(figure, path)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: redraw the figures and say what was made or skipped."""
    parser = argparse.ArgumentParser(prog="python -m smf_lib.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--results", default="results", help="where the result files are (default results/)")
    parser.add_argument("--out", default=str(Path("docs") / "figures"), help="default docs/figures/")
    args = parser.parse_args(argv)
    for name, made in make_figures(args.profile, args.results, args.out).items():
        print(f"{name}: {made}")


if __name__ == "__main__":
    main()
