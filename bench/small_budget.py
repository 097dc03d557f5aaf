"""``ktnas bench small-budget``: does a search at a small budget choose better than chance?

For each method (a search algorithm or benchmark variant with an architecture schedule, ``darts@paper``,
``darts@short``, ``gdas@short``, ``darts-pt@short``, ...) and each seed, ``ktnas search`` on one feature store at
one search budget (the demo's supernet by default), then ``ktnas train`` of the genotype it found exactly as the
demo trains (same network, epochs, samples and training seed: only the genotype differs). ``--random N``
architectures drawn uniformly are trained the same way: the distribution a search must beat. Each method's row:
search minutes, how far its architecture weights moved (the normal cell's entropy against its maximum), how stable
its genotype is across seeds (the share of edges whose op two seeds agree on, over all pairs), and the trained
accuracy (mean ± sd over seeds) against the random architectures' median and 90th percentile.

Every run is a ``ktnas`` command run in this process (its output in a log beside it), recorded in the report; a
rerun reuses the finished runs and resumes an interrupted one, so the benchmark can be stopped and continued.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import shlex
from pathlib import Path

import numpy as np

from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import resolve_device
from ktnas.engine.algorithms import resolve_variant, variant_argv
from ktnas.engine.runs import read_jsonl
from ktnas.engine.search.schedule import SCHEDULES
from ktnas.engine.spaces import SPACES, genotype_str, get_space, load_genotype, random_genotype

from .report import Column, Report, budget_id, mean_and_sd, mean_sd, positive

HELP = "search methods at a small budget against random architectures trained alike, over seeds"
DEMO_STORE = "runs/fashion-mnist_mobilenet_v2-features.3_64.zarr"
METHODS = "darts@paper,darts@short,gdas@paper,gdas@short,darts-pt@short"
# the demo's search supernet and its training (Makefile, `make demo`); a test holds these to the Makefile
DEMO_SEARCH = dict(layers=3, reductions="1,2", channels=8, batch_size=32, limit=2048)
DEMO_TRAIN = dict(epochs=3, limit=8192, layers=5, channels=32, batch_size=64)


def add_arguments(p) -> None:
    p.add_argument("--features", default=DEMO_STORE, help="feature store (default: the demo's, %(default)s)")
    p.add_argument("--space", default="darts", choices=tuple(SPACES), help="search space (default: %(default)s)")
    p.add_argument("--methods", default=METHODS, help="comma-separated ALGO[@SCHEDULE][:EPOCHS]: an algorithm or "
                   f"benchmark variant, an architecture schedule ({', '.join(SCHEDULES)}; default auto) and the "
                   "search epochs when they differ from --search-epochs (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="search seeds (default: %(default)s)")
    p.add_argument("--random", type=int, default=10, help="random architectures trained alike (default: 10)")
    p.add_argument("--search-epochs", type=int, default=10, help="search epochs (default: %(default)s)")
    for k, v in DEMO_SEARCH.items():
        p.add_argument(f"--search-{k.replace('_', '-')}", type=type(v), default=v,
                       help=f"the search's --{k.replace('_', '-')} (default: the demo's, %(default)s)")
    for k, v in DEMO_TRAIN.items():
        p.add_argument(f"--train-{k.replace('_', '-')}", type=int, default=v,
                       help=f"the training's --{k.replace('_', '-')} (default: the demo's, %(default)s)")
    p.add_argument("--train-seed", type=int, default=0, help="one training seed for every genotype (default: 0)")
    p.add_argument("--budget", default=None, metavar="KEY=VALUE,...", help="the searches' --budget on the trained "
                   "model (params=..,flops=..,latency=..ms); the random architectures are drawn until they fit")
    p.add_argument("--latency-table", default=None, metavar="FILE", help="the `ktnas bench latency` table of the "
                   "trained network: latency budgets and the latency column (default: measured into --out when the "
                   "budget has a latency)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")


def parse_method(text: str, epochs: int) -> dict:
    """``ALGO[@SCHEDULE][:EPOCHS]`` as ``{label, algo, options, schedule, epochs}``; a one-line KtnasError
    naming the form otherwise."""
    body, _, ep = text.partition(":")
    label, _, schedule = body.partition("@")
    schedule = schedule or "auto"
    if schedule not in SCHEDULES or (ep and not ep.isdigit()) or (ep and int(ep) < 1):
        raise KtnasError(f"method {text!r}: use ALGO[@SCHEDULE][:EPOCHS], SCHEDULE one of {', '.join(SCHEDULES)}, "
                         f"EPOCHS a positive integer (e.g. darts@short:12)")
    algo, options = resolve_variant(label)
    return dict(label=text, name=label, algo=algo, options=options, schedule=schedule, epochs=int(ep or epochs))


def _slug(text: str) -> str:
    return text.replace("@", "-").replace(":", "-e")


def _ktnas(argv: list, log: Path) -> None:
    """Run ``ktnas ARGV`` in this process, its output into ``log``; a failure is one line naming the log."""
    from ktnas.engine.cli import main

    argv = [str(a) for a in argv]
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        rc = main(argv)
    if rc != 0:
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        raise KtnasError(f"`ktnas {shlex.join(argv)}` failed ({(lines or ['no output'])[-1][:200]}): see {log}")


def _phase(commands: list, argv: list, run: Path, log: Path, done: bool) -> None:
    """Record the command; run it unless ``done`` (with --resume when the run is there: an interrupted one)."""
    commands.append("ktnas " + shlex.join(map(str, argv)))
    if not done:
        _ktnas(argv + (["--resume"] if (run / "config.json").exists() else []), log)


def _train(args, genotype: Path, tdir: Path, commands: list) -> dict:
    argv = ["train", "--features", args.features, "--genotype", genotype, "--out", tdir,
            *itertools.chain.from_iterable((f"--{k.replace('_', '-')}", getattr(args, f"train_{k}"))
                                           for k in DEMO_TRAIN),
            "--seed", args.train_seed, "--device", args.device, "--quiet"]
    _phase(commands, argv, tdir, tdir.with_suffix(".log"), (tdir / "model.pt").exists())
    return read_jsonl(tdir / "metrics.jsonl")[-1]


def _search(args, m: dict, seed: int, work: Path, commands: list) -> dict:
    sdir = work / f"{_slug(m['label'])}-s{seed}-search"
    argv = ["search", "--features", args.features, "--space", args.space, *variant_argv(m["name"]),
            "--schedule", m["schedule"], "--epochs", m["epochs"], "--seed", seed,
            *itertools.chain.from_iterable((f"--{k.replace('_', '-')}", getattr(args, f"search_{k}"))
                                           for k in DEMO_SEARCH),
            "--device", args.device, "--out", sdir, "--quiet"]
    if args.budget:
        argv += ["--budget", args.budget, "--train-layers", args.train_layers, "--train-channels", args.train_channels]
        argv += ["--latency-table", args.latency_table] if args.latency_table else []
    done = (sdir / "metrics.jsonl").exists() and len(read_jsonl(sdir / "metrics.jsonl")) >= m["epochs"]
    _phase(commands, argv, sdir, sdir.with_suffix(".log"), done)
    metrics = read_jsonl(sdir / "metrics.jsonl")
    config = json.loads((sdir / "config.json").read_text())
    trained = _train(args, sdir / "genotype.json", work / f"{_slug(m['label'])}-s{seed}-train", commands)
    # the normal cell's (NB201: its one cell's); for a selection by perturbation, the supernet's weights before
    # it (recorded since; earlier runs: the epoch before the last)
    last = metrics[-1]
    ratio = last.get("trained_entropy_ratio") or (metrics[-2] if "selection" in last and len(metrics) > 1
                                                   else last)["entropy_ratio"]
    return dict(seed=seed, search_min=sum(r["seconds"] for r in metrics) / 60,
                entropy_ratio=ratio.get("normal", next(iter(ratio.values()))),
                margin_median=metrics[-1].get("margin_median"), supported=metrics[-1].get("choice_supported"),
                schedule=config.get("schedule_used"), genotype_file=str(sdir / "genotype.json"),
                genotype=metrics[-1]["genotype"], test_acc=trained["test_acc"])


def _costs(args, space, work: Path):
    """The trained model's costs of a genotype (BudgetModel; predicted latency with a table or a latency budget)
    and the budget (None without --budget)."""
    from ktnas.cache.store import open_store
    from ktnas.engine.data import feature_info
    from ktnas.engine.search.budget import SearchBudget, budget_model, parse_budget

    limits = parse_budget(args.budget)
    with open_store(args.features) as store:
        model = budget_model(space, feature_info(store), True, store=store, layers=args.train_layers,
                             channels=args.train_channels, latency=bool(args.latency_table) or "latency" in limits,
                             latency_table=args.latency_table, out=work, progress=False)
    return model, (SearchBudget(space, limits, model, "cpu") if limits else None)


def _budget_id(args) -> str:
    """What every run depends on but the method and the seed: one folder of runs per budget."""
    keys = ("features", "space", "search_epochs", *(f"search_{k}" for k in DEMO_SEARCH),
            *(f"train_{k}" for k in DEMO_TRAIN), "train_seed", "device")
    extra = {k: getattr(args, k) for k in ("budget", "latency_table") if getattr(args, k, None)}
    return budget_id({**{k: getattr(args, k) for k in keys}, **extra})


def agreement(space, genotypes: list) -> float | None:
    """The share of edges (every cell type) whose op two genotypes agree on, averaged over all pairs: 1.0 when
    every seed found the same architecture; None for fewer than two."""
    codes = [np.concatenate([np.asarray(v) for _, v in sorted(space.encode(g).items())]) for g in genotypes]
    pairs = list(itertools.combinations(codes, 2))
    return float(np.mean([np.mean(a == b) for a, b in pairs])) if pairs else None


def bench_small_budget(args, work_dir: Path) -> tuple[list[dict], dict, list[str]]:
    """(one row per method, the random architectures' row, the commands that made them)."""
    for name in ("random", "search_epochs", *(f"search_{k}" for k in DEMO_SEARCH if k != "reductions"),
                 *(f"train_{k}" for k in DEMO_TRAIN)):
        positive(name, getattr(args, name), low=0 if name == "random" else 1)
    if not Path(args.features).exists():
        raise KtnasError(f"no feature store at {args.features}: build it first (`make demo` builds the default "
                         f"one, or ktnas precompute-features --out {args.features})")
    methods = [parse_method(t.strip(), args.search_epochs) for t in args.methods.split(",") if t.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not methods or not seeds:
        raise KtnasError(f"--methods takes ALGO[@SCHEDULE][:EPOCHS] and --seeds integers, got {args.methods!r} / "
                         f"{args.seeds!r}: e.g. --methods darts@paper,darts@short --seeds 0,1,2")
    space = get_space(args.space)
    work = Path(work_dir) / "runs" / _budget_id(args)  # another budget never reuses these runs
    work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    costs, budget = _costs(args, space, work)
    rand = []
    for i in range(args.random):
        path = work / f"random-{i}.json"
        rng = np.random.default_rng([i, 17])
        g = budget.draw(lambda: random_genotype(space, rng)) if budget else random_genotype(space, rng)
        g.save(path)
        rand.append(dict(index=i, genotype=genotype_str(g), cost=costs.values(g),
                         test_acc=_train(args, path, work / f"random-{i}-train", commands)["test_acc"]))
    rows = []
    for m in methods:
        runs = [_search(args, m, seed, work, commands) for seed in seeds]
        for r in runs:
            r["cost"] = costs.values(load_genotype(r["genotype_file"]))
        row = dict(method=m["label"], algo=m["algo"], options=m["options"], schedule=m["schedule"],
                   epochs=m["epochs"], seeds=seeds, runs=runs,
                   stability=agreement(space, [load_genotype(r["genotype_file"]) for r in runs]))
        for k in ("search_min", "entropy_ratio", "test_acc"):
            row[k], row[f"{k}_sd"] = mean_and_sd(r[k] for r in runs)
        rows.append(row)
    accs = np.array([r["test_acc"] for r in rand])
    random_row = dict(n=len(rand), runs=rand, median=float(np.median(accs)) if len(accs) else None,
                      p90=float(np.percentile(accs, 90)) if len(accs) else None,
                      best=max(rand, key=lambda r: r["test_acc"]) if rand else None)
    for row in rows:
        row["vs_random_median"] = None if random_row["median"] is None else row["test_acc"] - random_row["median"]
        row["random_percentile"] = (None if not len(accs) else
                                    float(np.mean(accs < row["test_acc"]) + 0.5 * np.mean(accs == row["test_acc"])))
    return rows, random_row, commands


def _f(digits: int, scale: float = 1.0, sign: str = ""):
    return lambda v: "-" if v is None else f"{v * scale:{sign}.{digits}f}"


COLUMNS = [Column("method", "method"), Column("epochs", "search epochs"),
           Column(None, "search min", mean_sd("search_min", _f(1))),
           Column(None, "normal-cell entropy, % of max", mean_sd("entropy_ratio", _f(1, 100))),
           Column("stability", "genotype stability (edge agreement across seeds)", _f(2)),
           Column(None, "trained test acc %", mean_sd("test_acc", _f(2))),
           Column("runs", "per seed", lambda rs: ", ".join(f"{r['test_acc']:.2f}" for r in rs)),
           Column("vs_random_median", "vs random median (points)", _f(2, sign="+")),
           Column("random_percentile", "percentile among random", _f(0, 100)),
           Column("runs", "trained model's cost per seed (weights M / multiply-adds M / predicted ms)",
                  lambda rs: ", ".join(cost_text(r.get("cost")) for r in rs[:3]) + (" ..." if len(rs) > 3 else ""))]


def cost_text(c: dict | None) -> str:
    """"0.288 / 36.5 / 0.84" (weights M / multiply-adds M / predicted latency ms where known)."""
    if not c:
        return "-"
    return f"{c['params'] / 1e6:.3f} / {c['flops'] / 1e6:.1f}" + (f" / {c['latency']:.2f}" if "latency" in c else "")


def _chart(ax, rows) -> None:
    rand = rows[-1]["random_runs"] if rows and "random_runs" in rows[-1] else []
    methods = [r for r in rows if "random_runs" not in r]
    if rand:
        accs = [r["test_acc"] for r in rand]
        ax.scatter(np.full(len(accs), -1.0) + np.linspace(-0.15, 0.15, len(accs)), accs, color="0.5", s=14,
                   label=f"{len(accs)} random architectures")
        for q, style in ((50, "--"), (90, ":")):
            ax.axhline(np.percentile(accs, q), color="0.4", ls=style, lw=1, label=f"random {q}th percentile")
    for i, r in enumerate(methods):
        accs = [x["test_acc"] for x in r["runs"]]
        ax.scatter(np.full(len(accs), float(i)), accs, s=18, zorder=3)
        ax.errorbar(i + 0.2, r["test_acc"], yerr=r.get("test_acc_sd") or 0, fmt="o", color="k", capsize=3)
    ax.set_xticks([-1, *range(len(methods))], ["random", *[r["method"] for r in methods]], fontsize=8,
                  rotation=20)
    ax.set_ylabel("trained test accuracy % (the demo's training)")
    ax.legend(fontsize=8, loc="lower right")


def report(args, work_dir=None) -> Report:
    rows, random_row, commands = bench_small_budget(args, Path(work_dir or "runs/bench-small-budget"))
    rand_line = dict(method=f"random (n={random_row['n']})", epochs=0, search_min=0.0, entropy_ratio=None,
                     stability=None, test_acc=random_row["median"], runs=random_row["runs"], vs_random_median=None,
                     random_percentile=None, random_runs=random_row["runs"], p90=random_row["p90"])
    notes = [f"every genotype trained as the demo trains: {args.train_layers} cells, C={args.train_channels}, "
             f"{args.train_epochs} epochs on the first {args.train_limit:,} samples, batch {args.train_batch_size}, "
             f"seed {args.train_seed}; search: {args.search_layers} cells, C={args.search_channels}, reductions "
             f"{args.search_reductions}, batch {args.search_batch_size}, the first {args.search_limit:,} training "
             f"samples (half search-train, half search-validation)",
             f"random architectures{' within --budget ' + args.budget if args.budget else ''}: median "
             f"{_f(2)(random_row['median'])}%, 90th percentile {_f(2)(random_row['p90'])}% (their row's accuracy is "
             "the median)" + (f"; the best {random_row['best']['test_acc']:.2f}% at "
                              f"{cost_text(random_row['best']['cost'])}" if random_row["best"] else ""),
             *([f"--budget {args.budget}: the searches' penalty and derivation, and the random draws, keep the "
                "trained model within it (latency as the table predicts it)"] if args.budget else []),
             "entropy: of the normal cell's softmax(alpha) at the end of the search, 100% = uniform; stability: the "
             "share of edges (both cells) on which two seeds' genotypes pick the same op, averaged over pairs",
             *[f"{r['method']}: schedule used {', '.join(str((x['schedule'] or {}).get('used')) for x in r['runs'])}"
               f"; genotypes: " + " / ".join(f"`{x['genotype']}`" for x in r["runs"]) for r in rows],
             *[f"`{c}`" for c in dict.fromkeys(commands)]]
    return Report("small-budget", "ktnas bench small-budget: search methods at a small budget against random "
                  "architectures", [*rows, rand_line], COLUMNS, _chart, device=str(resolve_device(args.device)),
                  notes=notes)
