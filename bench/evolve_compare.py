"""``ktnas bench evolve``: the sample-based searches of ``ktnas evolve`` at one candidate budget, over seeds.

For each seed and each entry of ``--algos`` (``random``; ``rea``, regularized evolution; ``predictor-gae`` and
``predictor-dcl``, the evolution guided by each predictor) one ``ktnas evolve`` run trains ``--population`` +
``--cycles`` candidates on the same store with the same candidate recipe. Reported per algorithm: the best
validation accuracy found (mean and sample sd over seeds, each seed's value in ``results.json``), the mean
best-so-far curve (PNG), the predictors' held-out Kendall tau at the end (5-fold over the run's own candidates)
and the candidates trained per hour. Each run lives in ``--out``/runs and is resumed or reused by a rerun.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import resolve_device
from ktnas.engine.evolve.loop import EvolveConfig, evolve
from ktnas.engine.spaces import SPACES

from .ranking import feature_store
from .loader import add_build_arguments
from .report import Column, Report, mean_and_sd, mean_sd

HELP = "random vs REA vs predictor-guided evolution (gae, dcl) at one candidate budget, over seeds"
ALGOS = {"random": dict(algo="random"), "rea": dict(algo="rea"),
         "predictor-gae": dict(algo="predictor", predictor="gae"),
         "predictor-dcl": dict(algo="predictor", predictor="dcl")}
QUICK = dict(seeds="0,1", population=6, cycles=9, samples=256, batch_size=32, layers=3, channels=4,
             pretrain_archs=128, pretrain_steps=20, proxy_pool=12)


def algo_options(name: str) -> dict | None:
    """EvolveConfig options of ``name``: an entry of :data:`ALGOS`, or ``ENTRY+PROXY`` (e.g. ``rea+synflow``), the
    same with its initial population screened by a zero-cost proxy; None for anything else."""
    from ktnas.engine.rank.proxies import PROXIES
    from ktnas.engine.rank.run import BASELINES

    base, plus, proxy = name.partition("+")
    if base not in ALGOS or (plus and proxy not in (*PROXIES, *BASELINES)):
        return None
    return dict(ALGOS[base], **({"proxy": proxy} if plus else {}))


def add_arguments(p) -> None:
    p.add_argument("--features", default=None, metavar="STORE",
                   help="store of the frozen stem's features (default: built in --out from --samples images)")
    p.add_argument("--space", default="nb201", choices=tuple(SPACES), help="search space (default: %(default)s)")
    p.add_argument("--algos", default=",".join(ALGOS), help="comma-separated; ALGO+PROXY (e.g. rea+synflow) screens "
                   "the initial population by a zero-cost proxy (default: %(default)s)")
    p.add_argument("--proxy-pool", type=int, default=100, help="architectures scored by the proxy of ALGO+PROXY "
                   "runs, the best --population trained (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--population", type=int, default=10, help="initial random candidates (default: %(default)s)")
    p.add_argument("--cycles", type=int, default=40, help="candidates after them; budget population + cycles "
                                                          "(default: %(default)s)")
    p.add_argument("--samples", type=int, default=2048,
                   help="first N train images: half train each candidate, half validate it (default: %(default)s)")
    p.add_argument("--epochs-per-candidate", type=int, default=1, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=0.1, help="default: %(default)s")
    p.add_argument("--layers", type=int, default=None, help="candidate cells (default: evolve's proxy)")
    p.add_argument("--channels", type=int, default=None, help="candidate width (default: evolve's proxy)")
    p.add_argument("--pretrain-archs", type=int, default=1024, help="predictors' pre-training set (default: 1024)")
    p.add_argument("--pretrain-steps", type=int, default=200, help="predictors' pre-training steps (default: 200)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--quick", action="store_true", help="a tiny run (CI): " + ", ".join(f"{k} {v}" for k, v in
                                                                                     QUICK.items()))
    add_build_arguments(p, chunk_size=False)


def _runs(args, store: str, work: Path) -> dict:
    """{algo: [evolve summary per seed]}: every (algo, seed) run, reused or resumed when it is in ``work``."""
    algos = [a for a in args.algos.split(",") if a]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        seeds = []
    if not seeds or any(algo_options(a) is None for a in algos) or not algos:
        raise KtnasError(f"--algos takes {', '.join(ALGOS)} (each optionally +PROXY) and --seeds integers, got "
                         f"{args.algos!r} / {args.seeds!r}: e.g. --algos random,rea,rea+synflow --seeds 0,1,2")
    out = {}
    for algo in algos:
        out[algo] = []
        for seed in seeds:
            run = work / f"{algo}-s{seed}"
            cfg = EvolveConfig(features=store, out=str(run), space=args.space, population=args.population,
                               sample=min(5, args.population), cycles=args.cycles,
                               epochs_per_candidate=args.epochs_per_candidate, batch_size=args.batch_size,
                               lr=args.lr, layers=args.layers, channels=args.channels, limit=args.samples,
                               pretrain_archs=args.pretrain_archs, pretrain_steps=args.pretrain_steps,
                               cv_folds=5 if args.population + args.cycles >= 15 else 0, seed=seed,
                               device=args.device, resume=(run / "checkpoint.pt").exists(), progress=False,
                               proxy_pool=args.proxy_pool, **algo_options(algo))
            out[algo].append(dict(evolve(cfg), seed=seed))
    return out


def bench_evolve(args, out: Path) -> list[dict]:
    for name in ("population", "cycles", "samples", "epochs_per_candidate", "batch_size", "pretrain_archs",
                 "pretrain_steps"):
        v = getattr(args, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "cycles" else 1):
            raise KtnasError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    out.mkdir(parents=True, exist_ok=True)
    store, _ = feature_store(args, out)
    rows = []
    for algo, runs in _runs(args, store, out / "runs").items():
        best, best_sd = mean_and_sd([r["best"]["val_acc"] for r in runs])
        taus = [(r["predictor"] or {}).get("kendall_tau") for r in runs]
        tau, tau_sd = mean_and_sd(taus)
        curves = np.array([r["best_so_far"] for r in runs])
        rows.append(dict(algo=algo, seeds=[r["seed"] for r in runs], budget=runs[0]["budget"], best_val_acc=best,
                         best_val_acc_sd=best_sd, per_seed=[r["best"]["val_acc"] for r in runs], tau=tau,
                         tau_sd=tau_sd, per_seed_tau=taus, curve_mean=curves.mean(0).tolist(),
                         curve_min=curves.min(0).tolist(), curve_max=curves.max(0).tolist(),
                         candidates_per_hour=float(np.mean([r["candidates_per_hour_total"] or 0 for r in runs])),
                         best_arch=[r["best"]["arch"] for r in runs]))
    return rows



COLUMNS = [Column("algo", "algorithm"), Column("budget", "candidates"),
           Column("seeds", "seeds", lambda v: ",".join(map(str, v))),
           Column(None, "best val acc %", mean_sd("best_val_acc", lambda v: f"{v:.2f}")),
           Column("per_seed", "per seed", lambda v: ", ".join(f"{x:.2f}" for x in v)),
           Column(None, "predictor held-out tau", mean_sd("tau", lambda v: f"{v:+.3f}")),
           Column("candidates_per_hour", "candidates / h", lambda v: f"{v:,.0f}")]


def _chart(ax, rows) -> None:
    for r in rows:
        x = np.arange(1, len(r["curve_mean"]) + 1)
        (line,) = ax.plot(x, r["curve_mean"], label=f"{r['algo']} (mean of {len(r['seeds'])})")
        ax.fill_between(x, r["curve_min"], r["curve_max"], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("candidates trained")
    ax.set_ylabel("best validation accuracy so far % (band: min-max over seeds)")
    ax.legend(fontsize=8)


def report(args, work_dir=None) -> Report:
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    rows = bench_evolve(args, Path(work_dir or "runs/bench-evolve"))
    notes = [f"space {args.space}; each run: {args.population} random candidates then {args.cycles} proposed; "
             f"candidates trained {args.epochs_per_candidate} epoch(s) on half of the first {args.samples} train "
             f"images (batch {args.batch_size}, lr {args.lr}), validated on the other half",
             f"predictors pre-trained on {args.pretrain_archs} architectures for {args.pretrain_steps} steps; tau: "
             "5-fold held-out over each run's own candidates", "runs in runs/ beside this report (reused by a rerun)"]
    return Report("evolve", "ktnas bench evolve: random vs REA vs predictor-guided evolution", rows, COLUMNS, _chart,
                  device=str(resolve_device(args.device)), notes=notes)
