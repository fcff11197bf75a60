"""Command line: `run` (the comparison on the test facts), `tune` (settings chosen on the tune facts), `stream`
(the facts taught in rounds) and `bench` (performance) of `python -m smf_lib`."""

from __future__ import annotations

import argparse
import ctypes
import sys

from .experiment import DEFAULT_METHODS
from .models import ModelNotAvailableError
from .profiles import PROFILES, default_profile
from .stream import TRAIN_PRECISIONS
from .training import METHODS


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


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                                         f"{', '.join(METHODS)}")
    return methods


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m smf_lib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train every method on the test facts, compare learning and forgetting")
    tune = commands.add_parser("tune", help="choose each method's learning rate on the tune facts")
    stream = commands.add_parser("stream", help="teach the test facts in rounds, measure what each round keeps")
    bench = commands.add_parser("bench", help="measure the retrofit's and the sparse trainer's cost")
    for command in (run, tune, stream, bench):
        command.add_argument("--profile", choices=list(PROFILES), default=None,
                             help="default: gpu with CUDA, else cpu")
    for command in (run, tune):
        command.add_argument("--methods", type=_methods, default=list(DEFAULT_METHODS),
                             help="comma-separated: smf_kl, smf_tfidf, smf_random, full_ft, lora")
    run.add_argument("--facts", default=None,
                     help="your own facts: a JSON Lines file (see README) or a hub dataset id")
    run.add_argument("--out", default=None, help="output folder (default results/<profile>/)")
    seeds = run.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="one seed (default 0)")
    seeds.add_argument("--seeds", type=_seeds, default=None, help="several seeds, e.g. 0,1,2: mean and spread")
    run.add_argument("--augment", type=int, default=None, metavar="N",
                     help="N more wordings per fact (its statements as blank questions, then ones the model writes)")
    for command in (run, tune):
        command.add_argument("--mode", choices=["additive", "replace"], default=None,
                             help="memory beside the MLPs (default) or in their place, healed first")
    run.add_argument("--tuned", default=None, help="tuned settings (default data/tuned-<profile>.json)")
    tune.add_argument("--out", default=None, help="output file (default data/tuned-<profile>.json)")
    stream.add_argument("--methods", type=_methods, default=["smf_kl", "full_ft", "lora"],
                        help="comma-separated: smf_kl, smf_tfidf, smf_random, full_ft, lora")
    stream.add_argument("--rounds", type=int, default=5, help="rounds the test facts arrive in (default 5)")
    stream.add_argument("--facts-per-round", type=int, default=None, metavar="N",
                        help="facts taught in each round (default: the profile's, 20 on cpu; else all shared out)")
    stream.add_argument("--out", default=None, help="output folder (default results/stream-<profile>/)")
    stream.add_argument("--share-rows", action="store_true",
                        help="let a round rewrite earlier rounds' memory rows (default: each round's rows are locked)")
    stream.add_argument("--fit-gates", type=int, default=None, metavar="N",
                        help="fit the memory's gates for N steps on practice facts first, then freeze them "
                             "(default 150 with a sparse method; 0: random gates)")
    stream.add_argument("--round-dropout", type=float, default=None, metavar="P",
                        help="take each earlier round's patch out at a training step with probability P "
                             "(default 0.5 with locked rounds, else 0)")
    stream.add_argument("--seed", type=int, default=0, help="seed of the memory, its gates and training (default 0)")
    stream.add_argument("--precision", choices=TRAIN_PRECISIONS, default="auto",
                        help="training's arithmetic (default auto: bf16 where the CPU or GPU has it natively, "
                             "else fp32); scoring is fp32")
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
            from .profiles import get_profile
            from .report import format_report
            from .tuning import tuned_settings

            hypers, tuning = tuned_settings(get_profile(profile), args.methods, args.tuned, mode=args.mode)
            seeds = args.seeds or [args.seed or 0]
            summary = run_experiment(profile, hypers, args.facts, args.out, seeds, tuning, args.augment, args.mode)
            print(format_report(summary))
            print(f"Results written to {args.out or f'results/{profile}/'}")
        elif args.command == "tune":
            from .profiles import get_profile
            from .report import format_tuning
            from .tuning import tune as tune_methods
            from .tuning import tuned_path

            result = tune_methods(profile, args.methods, args.out, mode=args.mode)
            print(format_tuning(result))
            print(f"Tuned settings written to {args.out or tuned_path(get_profile(profile), args.mode)}")
        elif args.command == "stream":
            from .stream import run_stream
            from .stream_report import format_stream

            print(format_stream(run_stream(profile, args.methods, args.rounds, args.out, lock=not args.share_rows,
                                           round_dropout=args.round_dropout, facts_per_round=args.facts_per_round,
                                           fit_gates=args.fit_gates, seed=args.seed,
                                           train_in=args.precision)))
            print(f"Results written to {args.out or f'results/stream-{profile}/'}")
        else:
            from .bench import format_table, run_bench

            print(format_table(run_bench(profile, args.out)))
    except (ModelNotAvailableError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
