"""Command line: `python -m smf_lib run` (the comparison) and `python -m smf_lib bench` (performance)."""

from __future__ import annotations

import argparse
import ctypes
import sys

from .models import ModelNotAvailableError
from .profiles import PROFILES, default_profile


def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from its heap and keep them once freed; return whether it could (Linux only).

    By default glibc maps every block above 32 MB (a value table's gradient, a batch's logits) fresh from the
    system and unmaps it when it is freed, so every training step faults that memory back in, page by page:
    8% of a `make run` went to system time. (Preloading jemalloc or tcmalloc is the other common remedy.)
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (e.g. musl): leave it be
        return False
    m_mmap_max, m_trim_threshold = -4, -1  # mallopt parameters from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m smf_lib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="retrofit, train every method on new facts, compare learning and forgetting")
    run.add_argument("--profile", choices=list(PROFILES), default=None, help="default: gpu with CUDA, else cpu")
    run.add_argument("--methods", default="smf_kl,smf_tfidf,full_ft,lora",
                     help="comma-separated: smf_kl, smf_tfidf, smf_random, full_ft, lora")
    run.add_argument("--facts", default=None, help="a JSON Lines file of your own facts (see README)")
    run.add_argument("--out", default=None, help="output folder (default results/<profile>/)")
    run.add_argument("--seed", type=int, default=0)
    bench = commands.add_parser("bench", help="measure the retrofit's and the sparse trainer's cost")
    bench.add_argument("--profile", choices=list(PROFILES), default=None)
    bench.add_argument("--out", default=None, help="output file (default results/bench-<profile>.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the chosen command; bad input ends with one clear line on stderr."""
    args = _parser().parse_args(argv)
    keep_freed_memory()
    profile = args.profile or default_profile()
    try:
        if args.command == "run":
            from .experiment import run_experiment
            from .report import format_report

            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            summary = run_experiment(profile, methods, args.facts, args.out, args.seed)
            print(format_report(summary))
            print(f"Results written to {args.out or f'results/{profile}/'}")
        else:
            from .bench import format_table, run_bench

            print(format_table(run_bench(profile, args.out)))
    except (ModelNotAvailableError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
