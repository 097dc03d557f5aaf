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

Same algorithm (with its options), epochs, batch size, search samples (``--search-limit``: the first N
training images, split into search-train and search-validation), seed and device for both searches. Every command
is recorded in the report, so each figure can be reproduced by itself.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import resolve_device
from ktnas.cache.stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM
from ktnas.engine.algorithms import algorithm_variants, resolve_variant, variant_argv
from ktnas.engine.layout import dropped_stages
from ktnas.engine.spaces import SPACES
from ktnas.engine.runs import read_jsonl

from .report import Column, Report, budget_id, mean_and_sd, mean_sd

HELP = "real data: KT-NAS from cached features vs classic DARTS from images, same search and training budget"


def add_arguments(p) -> None:
    p.add_argument("--dataset", default="fashion-mnist", help="data set (default: %(default)s)")
    p.add_argument("--stem", default=DEFAULT_STEM, help="KT-NAS stem ARCH:CUT (default: %(default)s)")
    p.add_argument("--weights", default="imagenet", help="stem weights (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="stem input px (default: %(default)s)")
    p.add_argument("--space", default="darts", choices=tuple(SPACES), help="search space (default: %(default)s)")
    p.add_argument("--algo", default="darts", help="the search algorithm: a name of `ktnas search --algo` or a "
                   f"variant ({', '.join(algorithm_variants())}) (default: %(default)s)")
    p.add_argument("--search-epochs", type=int, default=3, help="both searches (default: %(default)s)")
    p.add_argument("--search-limit", type=int, default=10000,
                   help="first N training images for search-train + search-validation (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="search batch, both (default: %(default)s)")
    p.add_argument("--search-channels", type=int, default=None,
                   help="width of the classic supernet's first cells (default: the paper's 16); KT-NAS's supernet "
                        "is widened by the paper rule, x2 per stage the stem replaces (a CPU budget: e.g. 8)")
    p.add_argument("--train-epochs", type=int, default=10, help="training of each genotype (default: %(default)s)")
    p.add_argument("--train-limit", type=int, default=None, help="first N samples of each split for training "
                   "and test (default: all)")
    p.add_argument("--train-layers", type=int, default=8, help="cells of the trained network (default: 8)")
    p.add_argument("--train-channels", type=int, default=16, help="its channels (default: 16)")
    p.add_argument("--train-batch-size", type=int, default=96)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--algos", default=None, help="comma-separated algorithms, each searched both ways (default: "
                                                 "--algo)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: every search and training once per seed, "
                                                 "reported as mean and spread (default: --seed)")
    p.add_argument("--random-baseline", action="store_true",
                   help="also train one random architecture per seed the same way (does a search beat chance?)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on a CPU: 512 search images, 1 search epoch, supernets at half width "
                        "(--search-channels 8), 2 training epochs of a 5-cell C=8 network on 2,048")


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


def _done_epochs(run: Path) -> int:
    return len(read_jsonl(run / "metrics.jsonl")) if (run / "metrics.jsonl").exists() else 0


def _phase(phases: dict, name: str, argv: list[str], run: Path, log: Path, done: bool) -> None:
    """Record phase ``name`` and run it unless ``done`` (a rerun finishes an interrupted run with --resume)."""
    phases[name] = argv
    if not done:
        _run(argv + (["--resume"] if (run / "config.json").exists() else []), log)


def _train_genotype(args, key, genotype, store, seed, common, work, phases) -> tuple[dict, Path]:
    """Train ``genotype`` on the store's cached features (the same recipe for every row): its last metrics."""
    tdir = work / f"{key}-train"
    train = _cli("train", "--features", store, "--genotype", genotype, "--out", tdir, "--epochs", args.train_epochs,
                 "--layers", args.train_layers, "--channels", args.train_channels, "--batch-size",
                 args.train_batch_size, "--seed", seed, "--drop-path", 0,
                 *(["--limit", args.train_limit] if args.train_limit else []), *common)
    _phase(phases, f"{key} train", train, tdir, work / f"{key}-train.log", (tdir / "model.pt").exists())
    return read_jsonl(tdir / "metrics.jsonl")[-1], tdir


def _one_config(args, config, algo, seed, source, store, common, precompute_s, device, work, phases) -> dict:
    """Search with one stem (``source``), train the found cells on the store, evaluate (KT-NAS): its row. Each
    phase already finished in ``work`` is reused (its own recorded seconds), an interrupted one resumed."""
    key = f"{config}-{algo}-s{seed}"
    sdir = work / f"{key}-search"
    search = _cli("search", *source, "--space", args.space, *variant_argv(algo), "--epochs",
                  args.search_epochs, "--batch-size", args.batch_size, "--limit", args.search_limit, "--seed", seed,
                  "--precision", args.precision, *common, "--out", sdir)
    done = _done_epochs(sdir) >= args.search_epochs
    t0 = time.perf_counter()
    _phase(phases, f"{key} search", search, sdir, work / f"{key}-search.log", done)
    if not done or not (sdir / "wall_s.json").exists():
        (sdir / "wall_s.json").write_text(json.dumps(time.perf_counter() - t0))
    metrics = read_jsonl(sdir / "metrics.jsonl")
    trained, tdir = _train_genotype(args, key, sdir / "genotype.json", store, seed, common, work, phases)
    config_json = json.loads((sdir / "config.json").read_text())
    search_s, last = sum(m["seconds"] for m in metrics), metrics[-1]
    row = dict(config=config, space=args.space, algo=algo, seed=seed, batch=args.batch_size,
               device=device, search_epochs=args.search_epochs, search_samples=args.search_limit, search_s=search_s,
               search_wall_s=json.loads((sdir / "wall_s.json").read_text()),
               precompute_s=precompute_s if config == "kt-nas" else 0.0,
               cost_s=search_s + (precompute_s if config == "kt-nas" else 0.0),
               peak_mem_bytes=max(m["peak_memory_bytes"] for m in metrics),
               search_val_acc=last["val_acc"], test_acc=trained["test_acc"], raw_test_acc=None,
               params=config_json.get("params"), supernet=config_json.get("layout"), genotype=last["genotype"],
               skips=last.get("skips"), entropy=(last.get("entropy") or {}).get("normal"),
               kernels=config_json.get("kernels_used"))
    if config == "kt-nas":
        ev = _cli("evaluate", "--model", tdir / "model.pt", "--dataset", args.dataset, "--split", "test",
                  "--json", *(["--limit", args.train_limit] if args.train_limit else []), *common)
        log = work / f"{key}-evaluate.log"
        phases[f"{key} evaluate"] = ev
        if not (log.exists() and any(ln.startswith("{") for ln in log.read_text().splitlines())):
            _run(ev, log)
        row["raw_test_acc"] = _last_json(log)["accuracy"]
    return row


def _widths(args, store: Path) -> dict:
    """``--channels`` of each supernet for ``--search-channels`` (none without it): the classic one's as given,
    KT-NAS's doubled per stage its stem replaces (the side of the store's feature maps tells how many)."""
    if args.search_channels is None:
        return {"kt-nas": [], "classic": []}
    from ktnas.cache.store import open_store

    with open_store(store) as s:
        stages = dropped_stages(int(s.split("train").sample_shape[-1]))
    return {"kt-nas": ["--channels", args.search_channels * 2 ** stages],
            "classic": ["--channels", args.search_channels]}


def _random_row(args, seed, store, common, device, work, phases) -> dict:
    """One architecture drawn uniformly (seeded) and trained as the found ones are: the chance level."""
    from ktnas.engine.spaces import count_skips, genotype_str, random_genotype

    g = random_genotype(args.space, np.random.default_rng([seed, 17]))
    path = work / f"random-s{seed}.json"
    g.save(path)
    trained, _ = _train_genotype(args, f"random-s{seed}", path, store, seed, common, work, phases)
    return dict(config="random", space=args.space, algo="-", seed=seed, batch=args.batch_size,
                device=device, search_epochs=0, search_samples=0, search_s=0.0, search_wall_s=0.0, precompute_s=0.0,
                cost_s=0.0, peak_mem_bytes=None, search_val_acc=None, test_acc=trained["test_acc"],
                raw_test_acc=None, params=None, genotype=genotype_str(g), skips=count_skips(g), entropy=None)


def _aggregate(rows: list[dict]) -> list[dict]:
    """One row per (config, algo): the mean and spread (sample sd) over seeds, the runs kept inside."""
    out = []
    for key in dict.fromkeys((r["config"], r["algo"]) for r in rows):
        runs = [r for r in rows if (r["config"], r["algo"]) == key]
        agg = dict(runs[0], seeds=[r["seed"] for r in runs], runs=runs)
        for k in ("search_s", "search_wall_s", "precompute_s", "cost_s", "peak_mem_bytes", "search_val_acc",
                  "test_acc", "raw_test_acc", "skips", "entropy"):
            agg[k], agg[f"{k}_sd"] = mean_and_sd(r[k] for r in runs)
        if len(runs) > 1:
            agg["genotype"] = " / ".join(r["genotype"] for r in runs)
        out.append(agg)
    return out


def bench_accuracy(args, work_dir: Path) -> tuple[list[dict], list[str]]:
    """Rows ``{config: kt-nas | classic, search_s, search_wall_s, precompute_s, cost_s, peak_mem_bytes,
    search_val_acc, test_acc, raw_test_acc, genotype, params, device}`` and the commands that made them."""
    if args.quick:
        args.search_limit, args.search_epochs, args.train_epochs = 512, 1, 2
        args.train_limit = args.train_limit or 2048
        args.train_layers, args.train_channels = min(args.train_layers, 5), min(args.train_channels, 8)
        args.search_channels = min(args.search_channels or 8, 8)
    for name in ("search_epochs", "search_limit", "batch_size", "train_epochs", "train_layers", "train_channels",
                 "search_channels"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise KtnasError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = str(resolve_device(args.device))
    work = Path(work_dir) / "runs" / _budget_id(args, device)  # another budget never reuses these phases
    work.mkdir(parents=True, exist_ok=True)
    store = work / "features.zarr"
    limit = None if args.train_limit is None else max(args.train_limit, args.search_limit)
    common = ["--device", args.device, "--quiet"]
    phases = {}
    pre = _cli("precompute-features", "--dataset", args.dataset, "--stem", args.stem, "--weights", args.weights,
               "--image-size", args.image_size, "--out", store, "--seed", args.seed,
               *(["--limit", limit] if limit else []), *common)
    if not (work / "precompute_s.json").exists():  # a rerun reuses the store and reports its first time
        phases["precompute"] = pre
        seconds = _run(pre + (["--resume"] if store.exists() else []), work / "precompute.log")
        (work / "precompute_s.json").write_text(json.dumps(seconds))
    precompute_s = json.loads((work / "precompute_s.json").read_text())
    algos = [a for a in (args.algos or args.algo).split(",") if a]
    try:
        seeds = [int(x) for x in (args.seeds or str(args.seed)).split(",") if x]
    except ValueError:
        seeds = []
    for a in algos:
        resolve_variant(a)  # a one-line refusal of an unknown name
    if not algos or not seeds:
        raise KtnasError(f"--algos takes algorithms and --seeds integers, got {args.algos!r} / {args.seeds!r}: e.g. "
                         f"--algos darts,gdas --seeds 0,1,2")
    width = _widths(args, store)
    runs = {"kt-nas": ["--features", store, *width["kt-nas"]],
            "classic": ["--stem", "none", "--dataset", args.dataset, *width["classic"]]}
    rows = []
    for seed in seeds:
        for algo in algos:
            rows += [_one_config(args, config, algo, seed, source, store, common, precompute_s, device, work, phases)
                     for config, source in runs.items()]
        if args.random_baseline:
            rows.append(_random_row(args, seed, store, common, device, work, phases))
    rows = _aggregate(rows)
    for r in rows:
        base = next((b for b in rows if b["config"] == "classic" and b["algo"] == r["algo"]),
                    next(b for b in rows if b["config"] == "classic"))
        r["cost_vs_classic"] = r["cost_s"] / base["cost_s"] if base["cost_s"] and r["cost_s"] else None
        r["mem_vs_classic"] = (r["peak_mem_bytes"] / base["peak_mem_bytes"]
                               if base["peak_mem_bytes"] and r["peak_mem_bytes"] else None)
        r["acc_minus_classic"] = r["test_acc"] - base["test_acc"]
    return rows, [f"{name}: `{_show(argv)}`" for name, argv in phases.items()]


def _budget_id(args, device: str) -> str:
    """What every phase's result depends on but the algorithm and the seed: one folder of runs per budget."""
    keys = ("dataset", "stem", "weights", "image_size", "space", "search_epochs", "search_limit",
            "search_channels", "batch_size", "train_epochs", "train_limit", "train_layers", "train_channels",
            "train_batch_size", "precision")
    return budget_id({k: getattr(args, k) for k in keys} | dict(device=device))


def _last_json(path: Path) -> dict:
    """The last line of ``path`` that is a JSON object (``ktnas evaluate --json`` prints one)."""
    for line in reversed(path.read_text().splitlines()):
        if line.strip().startswith("{"):
            return json.loads(line)
    raise KtnasError(f"{path} holds no JSON result line: see the log")


def _s(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _search(r) -> str:
    if r["config"] == "random":
        return "none: one uniformly drawn architecture per seed"
    net = r.get("supernet")
    net = f", supernet {net['layers']} cells C={net['channels']}" if net else ""
    return f"{r['algo']}, {r['search_epochs']} ep, {r['search_samples']:,} img, batch {r['batch']}{net}"



COLUMNS = [Column("config", "config"), Column(None, "search", _search),
           Column("seeds", "seeds", lambda v: ",".join(map(str, v))),
           Column(None, "cost s", mean_sd("cost_s", _s)),
           Column("precompute_s", "of which precompute", _s),
           Column("cost_vs_classic", "cost vs classic", lambda v: "-" if v is None else f"{v:.2f}x"),
           Column("peak_mem_bytes", "peak MiB", lambda v: "-" if v is None else f"{v / 2**20:,.0f}"),
           Column("mem_vs_classic", "memory vs classic", lambda v: "-" if v is None else f"{v:.2f}x"),
           Column(None, "trained test acc %", mean_sd("test_acc", lambda v: f"{v:.2f}")),
           Column("acc_minus_classic", "vs classic (points)", lambda v: f"{v:+.2f}"),
           Column(None, "skips (normal)", mean_sd("skips", lambda v: f"{v:.1f}")),
           Column(None, "alpha entropy (normal)", mean_sd("entropy", lambda v: f"{v:.3f}")),
           Column("raw_test_acc", "exported model on raw images %", lambda v: "-" if v is None else f"{v:.2f}"),
           Column("genotype", "genotype(s)", lambda v: f"`{v}`")]


def _chart(ax, rows) -> None:
    names = [r["config"] if r["config"] == "random" else f"{r['config']} {r['algo']}" for r in rows]
    ax2 = ax.twinx()
    ax.bar([i - 0.2 for i in range(len(rows))], [r["cost_s"] for r in rows], 0.4, color="tab:blue",
           label="cost s (precompute + search)")
    ax2.bar([i + 0.2 for i in range(len(rows))], [r["test_acc"] for r in rows], 0.4, color="tab:green",
            yerr=[r.get("test_acc_sd") or 0 for r in rows], capsize=3, label="trained test accuracy % (± sd)")
    lo = min(r["test_acc"] for r in rows)
    ax2.set_ylim(max(0.0, lo - 5), 100)
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylabel("seconds")
    ax2.set_ylabel("test accuracy %")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)


def report(args, work_dir=None) -> Report:
    rows, commands = bench_accuracy(args, Path(work_dir or "runs/bench-accuracy"))
    notes = ["cost = precompute (KT-NAS only) + the search's own epoch seconds (ktnas search's metrics.jsonl); "
             "peak memory: max_memory_allocated on CUDA, the search process's peak RSS on the CPU",
             f"every genotype trained the same way on the same cached features: {args.train_layers} cells, "
             f"C={args.train_channels}, {args.train_epochs} epochs, batch {args.train_batch_size}, the run's seed"
             + (f", first {args.train_limit:,} samples of each split" if args.train_limit else ", all samples"),
             "mean ± sample sd over the seeds; skips: skip connections in the found normal cell (DARTS' collapse "
             "signal; NB201: in the cell); alpha entropy: of the normal cell's architecture weights at the end",
             *[f"{r['config']} {r['algo']} per seed: " + ", ".join(f"seed {x['seed']} {x['test_acc']:.2f}%"
                                                                    for x in r["runs"]) for r in rows],
             *commands]
    return Report("accuracy", "ktnas bench accuracy: KT-NAS from cached features vs classic DARTS from images",
                  rows, COLUMNS, _chart, device=rows[0]["device"], notes=notes)
