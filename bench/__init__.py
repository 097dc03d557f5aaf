"""ktnas.bench: benchmarks behind ``ktnas bench NAME``.

Each benchmark is a module with ``HELP``, ``add_arguments(parser)`` and ``report(args, work_dir) -> Report``,
plus a plain Python function returning its rows (:func:`bench_loader`, :func:`bench_precompute`,
:func:`bench_search`). ``ktnas bench NAME --out DIR`` (default ``runs/bench-NAME``) writes ``results.json``,
``results.md`` and ``results.png`` there and prints the markdown. Numbers are measured in one run on one
machine: compare ratios within a report, not absolute rates across machines. A new benchmark is one module and
one entry in :data:`BENCHMARKS`.
"""
from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path

import torch

from ktnas.cache.errors import KtnasError

from .loader import bench_loader
from .precompute import bench_precompute
from .report import write_report
from .search import bench_search

BENCHMARKS = {"loader": "ktnas.bench.loader", "precompute": "ktnas.bench.precompute", "kernels": "ktnas.bench.kernels",
              "search": "ktnas.bench.search_report", "accuracy": "ktnas.bench.accuracy", "step": "ktnas.bench.step",
              "store": "ktnas.bench.store", "ranking": "ktnas.bench.ranking",
              "evolve": "ktnas.bench.evolve_compare", "small-budget": "ktnas.bench.small_budget",
              "latency": "ktnas.bench.latency"}


def _module(name: str):
    return importlib.import_module(BENCHMARKS[name])


def add_bench_parser(sub) -> None:
    """Add ``bench`` (with one sub-subcommand per benchmark) to the ``ktnas`` subparsers ``sub``."""
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS),
                       description="Run a benchmark; write results.json, results.md and results.png to --out.")
    bsub = p.add_subparsers(dest="bench", required=True)
    for name in BENCHMARKS:
        mod = _module(name)
        b = bsub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(b)
        b.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads for the run (default: torch's own choice)")
        b.add_argument("--out", default=None, help=f"results folder (default: runs/bench-{name})")
        b.set_defaults(func=run_bench, bench_parser=b)


def register(subparsers) -> None:
    """The ``ktnas.commands`` entry point ``bench`` (see pyproject.toml): adds ``ktnas bench``."""
    add_bench_parser(subparsers)


def command_line(args) -> str:
    """The full ``ktnas bench NAME ...`` command of ``args``, every option spelled out (reproduces the run)."""
    parts = ["ktnas", "bench", args.bench]
    for a in args.bench_parser._actions:
        if not a.option_strings or a.dest == "help":
            continue
        v = getattr(args, a.dest, None)
        if v is None or v is False:
            continue
        flag = max(a.option_strings, key=len)
        parts += [flag] if a.nargs == 0 else [flag, str(v)]
    return shlex.join(parts)


def run_bench(args) -> int:
    """Run the benchmark ``args.bench`` chose, write its results to ``args.out``, print the markdown."""
    if args.threads is not None and args.threads < 1:
        raise KtnasError(f"--threads must be >= 1, got {args.threads}: pass a positive number of threads")
    args.out = args.out or f"runs/bench-{args.bench}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        report = _module(args.bench).report(args, work_dir=out)
        text = write_report(out, report, command_line(args))
    finally:
        torch.set_num_threads(threads)
    print(text, end="")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}", file=sys.stderr)
    return 0


__all__ = ["BENCHMARKS", "add_bench_parser", "register", "run_bench", "command_line", "bench_loader",
           "bench_precompute", "bench_search"]
