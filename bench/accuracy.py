"""``ktnas bench accuracy``: the same search twice on real data, KT-NAS from cached stem features and classic DARTS
from images, each found architecture trained with the same budget; accuracy against cost.

Phases, each a ``ktnas`` command in a fresh process (so the CPU's peak RSS is each phase's own; on CUDA the
peak is ``max_memory_allocated``, recorded by ``ktnas search`` per epoch), in this order:

1. ``ktnas precompute-features`` of the data set through the frozen stem into a Zarr store (KT-NAS's cost);
2. ``ktnas search --features STORE`` (KT-NAS);
3. ``ktnas search --stem none --dataset D`` (classic DARTS from 32 px images: DARTS' conv stem, all cells);
4. ``ktnas train`` of each found genotype with the same network size, epochs, batch and seed on the cached
   features of the same store (only the genotype differs), test accuracy on the test split;
5. ``ktnas evaluate`` of KT-NAS's exported model on raw test images (the stem + cells as users run them).

Same algorithm, order, epochs, batch size, search samples (``--search-limit``: the first N training images, split
into search-train and search-validation), seed and device for both searches. Every command is recorded in the
report, so each figure can be reproduced by itself.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import resolve_device
from ktnas.cache.stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM
from ktnas.engine.runs import read_jsonl

from .report import Column, Report

HELP = "real data: KT-NAS from cached features vs classic DARTS from images, same search and training budget"


def add_arguments(p) -> None:
    p.add_argument("--dataset", default="fashion-mnist", help="data set (default: %(default)s)")
    p.add_argument("--stem", default=DEFAULT_STEM, help="KT-NAS stem ARCH:CUT (default: %(default)s)")
    p.add_argument("--weights", default="imagenet", help="stem weights (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="stem input px (default: %(default)s)")
    p.add_argument("--space", default="darts", choices=("darts", "nb201"))
    p.add_argument("--algo", default="darts", choices=("darts", "pcdarts", "gdas", "random"))
    p.add_argument("--order", type=int, default=1, choices=(1, 2))
    p.add_argument("--search-epochs", type=int, default=3, help="both searches (default: %(default)s)")
    p.add_argument("--search-limit", type=int, default=10000,
                   help="first N training images for search-train + search-validation (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="search batch, both (default: %(default)s)")
    p.add_argument("--train-epochs", type=int, default=10, help="training of each genotype (default: %(default)s)")
    p.add_argument("--train-limit", type=int, default=None, help="first N samples of each split for training "
                   "and test (default: all)")
    p.add_argument("--train-layers", type=int, default=8, help="cells of the trained network (default: 8)")
    p.add_argument("--train-channels", type=int, default=16, help="its channels (default: 16)")
    p.add_argument("--train-batch-size", type=int, default=96)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on a CPU: 512 search images, 1 search epoch, 2 training epochs on 2,048")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "ktnas.engine.cli", *map(str, args)]


def _run(argv: list[str], log: Path) -> float:
    """Run one phase; its output goes to ``log``; seconds of wall time. A failing phase stops the benchmark with
    the phase's own last error line."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        raise KtnasError(f"phase `{_show(argv)}` failed ({(lines or ['no output'])[-1][:200]}): see {log}")
    return seconds


def _show(argv: list[str]) -> str:
    return "ktnas " + shlex.join(argv[3:])


def _one_config(args, config, source, store, search_common, common, precompute_s, device, work, phases) -> dict:
    """Search with one stem (``source``), train the found cells on the store, evaluate (KT-NAS): its row."""
    sdir, tdir = work / f"{config}-search", work / f"{config}-train"
    for d in (sdir, tdir):  # every search and training is measured afresh
        shutil.rmtree(d, ignore_errors=True)
    search = _cli("search", *source, *search_common, "--out", sdir)
    search_wall = _run(search, work / f"{config}-search.log")
    metrics = read_jsonl(sdir / "metrics.jsonl")
    train = _cli("train", "--features", store, "--genotype", sdir / "genotype.json", "--out", tdir,
                 "--epochs", args.train_epochs, "--layers", args.train_layers, "--channels", args.train_channels,
                 "--batch-size", args.train_batch_size, "--seed", args.seed, "--drop-path", 0,
                 *(["--limit", args.train_limit] if args.train_limit else []), *common)
    _run(train, work / f"{config}-train.log")
    trained = read_jsonl(tdir / "metrics.jsonl")[-1]
    config_json = json.loads((sdir / "config.json").read_text())
    search_s = sum(m["seconds"] for m in metrics)
    row = dict(config=config, space=args.space, algo=args.algo, order=args.order, batch=args.batch_size,
               device=device, search_epochs=args.search_epochs,
               search_samples=args.search_limit, search_s=search_s, search_wall_s=search_wall,
               precompute_s=precompute_s if config == "kt-nas" else 0.0,
               cost_s=search_s + (precompute_s if config == "kt-nas" else 0.0),
               peak_mem_bytes=max(m["peak_memory_bytes"] for m in metrics),
               search_val_acc=metrics[-1]["val_acc"], test_acc=trained["test_acc"], raw_test_acc=None,
               params=config_json.get("params"), genotype=metrics[-1]["genotype"],
               kernels=config_json.get("kernels_used"))
    phases[f"{config} search"] = (search, search_wall)
    phases[f"{config} train"] = (train, None)
    if config == "kt-nas":
        ev = _cli("evaluate", "--model", tdir / "model.pt", "--dataset", args.dataset, "--split", "test",
                  "--json", *(["--limit", args.train_limit] if args.train_limit else []), *common)
        _run(ev, work / "evaluate.log")
        row["raw_test_acc"] = _last_json(work / "evaluate.log")["accuracy"]
        phases["kt-nas evaluate"] = (ev, None)
    return row


def bench_accuracy(args, work_dir: Path) -> tuple[list[dict], list[str]]:
    """Rows ``{config: kt-nas | classic, search_s, search_wall_s, precompute_s, cost_s, peak_mem_bytes,
    search_val_acc, test_acc, raw_test_acc, genotype, params, device}`` and the commands that made them."""
    if args.quick:
        args.search_limit, args.search_epochs, args.train_epochs = 512, 1, 2
        args.train_limit = args.train_limit or 2048
        args.train_layers, args.train_channels = min(args.train_layers, 5), min(args.train_channels, 8)
    for name in ("search_epochs", "search_limit", "batch_size", "train_epochs", "train_layers", "train_channels"):
        if getattr(args, name) < 1:
            raise KtnasError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = str(resolve_device(args.device))
    work = Path(work_dir) / "runs"
    work.mkdir(parents=True, exist_ok=True)
    store = work / "features.zarr"
    limit = None if args.train_limit is None else max(args.train_limit, args.search_limit)
    common = ["--device", args.device, "--quiet"]
    phases = {}
    if not store.exists():  # a rerun into the same --out reuses the store (and reports its first time)
        pre = _cli("precompute-features", "--dataset", args.dataset, "--stem", args.stem, "--weights",
                   args.weights, "--image-size", args.image_size, "--out", store, "--seed", args.seed,
                   *(["--limit", limit] if limit else []), *common)
        phases["precompute"] = (pre, _run(pre, work / "precompute.log"))
        (work / "precompute_s.json").write_text(json.dumps(phases["precompute"][1]))
    precompute_s = json.loads((work / "precompute_s.json").read_text())
    search_common = ["--space", args.space, "--algo", args.algo, "--order", args.order, "--epochs",
                     args.search_epochs, "--batch-size", args.batch_size, "--limit", args.search_limit, "--seed",
                     args.seed, "--precision", args.precision, *common]
    runs = {"kt-nas": ["--features", store], "classic": ["--stem", "none", "--dataset", args.dataset]}
    rows = [_one_config(args, config, source, store, search_common, common, precompute_s, device, work, phases)
            for config, source in runs.items()]
    base = rows[1]
    for r in rows:
        r["cost_vs_classic"] = r["cost_s"] / base["cost_s"] if base["cost_s"] else None
        r["mem_vs_classic"] = r["peak_mem_bytes"] / base["peak_mem_bytes"] if base["peak_mem_bytes"] else None
        r["acc_minus_classic"] = r["test_acc"] - base["test_acc"]
    return rows, [f"{name}: `{_show(argv)}`" for name, (argv, _) in phases.items()]


def _last_json(path: Path) -> dict:
    """The last line of ``path`` that is a JSON object (``ktnas evaluate --json`` prints one)."""
    for line in reversed(path.read_text().splitlines()):
        if line.strip().startswith("{"):
            return json.loads(line)
    raise KtnasError(f"{path} holds no JSON result line: see the log")


def _s(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _search(r) -> str:
    order = " order 2" if r["order"] == 2 and r["algo"] in ("darts", "pcdarts") else ""
    return f"{r['algo']}{order}, {r['search_epochs']} ep, {r['search_samples']:,} img, batch {r['batch']}"


COLUMNS = [Column("config", "config"), Column("device", "device"), Column(None, "search", _search),
           Column("precompute_s", "precompute s", _s), Column("search_s", "search s", _s),
           Column("cost_vs_classic", "cost vs classic", lambda v: "-" if v is None else f"{v:.2f}x"),
           Column("peak_mem_bytes", "peak MiB", lambda v: f"{v / 2**20:,.0f}"),
           Column("mem_vs_classic", "memory vs classic", lambda v: "-" if v is None else f"{v:.2f}x"),
           Column("search_val_acc", "search val acc", lambda v: f"{v:.3f}"),
           Column("test_acc", "trained test acc %", lambda v: f"{v:.2f}"),
           Column("acc_minus_classic", "vs classic (points)", lambda v: f"{v:+.2f}"),
           Column("raw_test_acc", "exported model on raw images %", lambda v: "-" if v is None else f"{v:.2f}"),
           Column("genotype", "genotype", lambda v: f"`{v}`")]


def _chart(ax, rows) -> None:
    names = [r["config"] for r in rows]
    ax2 = ax.twinx()
    ax.bar([i - 0.2 for i in range(len(rows))], [r["cost_s"] for r in rows], 0.4, color="tab:blue",
           label="cost s (precompute + search)")
    ax2.bar([i + 0.2 for i in range(len(rows))], [r["test_acc"] for r in rows], 0.4, color="tab:green",
            label="trained test accuracy %")
    lo = min(r["test_acc"] for r in rows)
    ax2.set_ylim(max(0.0, lo - 5), 100)
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("seconds")
    ax2.set_ylabel("test accuracy %")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)


def report(args, work_dir=None) -> Report:
    rows, commands = bench_accuracy(args, Path(work_dir or "runs/bench-accuracy"))
    notes = ["cost = precompute (KT-NAS only) + the search's own epoch seconds (ktnas search's metrics.jsonl); "
             "peak memory: max_memory_allocated on CUDA, the search process's peak RSS on the CPU",
             f"both genotypes trained the same way on the same cached features: {args.train_layers} cells, "
             f"C={args.train_channels}, {args.train_epochs} epochs, batch {args.train_batch_size}, seed {args.seed}"
             + (f", first {args.train_limit:,} samples of each split" if args.train_limit else ", all samples"),
             *commands]
    return Report("accuracy", "ktnas bench accuracy: KT-NAS from cached features vs classic DARTS from images",
                  rows, COLUMNS, _chart, device=rows[0]["device"], notes=notes)
