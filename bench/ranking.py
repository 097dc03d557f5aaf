"""``ktnas bench ranking``: does training on the frozen stem's cached features rank architectures as training
the whole network on images does? The premise of KT-NAS, measured.

``--candidates`` N architectures are sampled uniformly from the space (seeded, distinct). Each is trained two
ways with one recipe (``ktnas evolve``'s candidate training: SGD, cosine lr, the same epochs, batch and samples,
the first ``--samples`` images of the train split, half to train on and half to validate on, split by the seed):

- **KT-NAS**: the cells on the store's cached features of the frozen stem (the proxy network minus the stages
  the stem replaces), as ``ktnas evolve`` trains them;
- **classic**: the whole proxy network with its own trainable 3x3 conv stem on the same images at their native
  size (the paper's networks; 28 px Fashion-MNIST, 32 px CIFAR), as a classic NAS evaluates candidates.

Reported: Kendall tau-b and Spearman rho between the two validation-accuracy lists with percentile bootstrap
intervals (candidates resampled), the overlap of their top-k sets, the cost per candidate of each way (KT-NAS
with and without its share of the precompute), and a scatter PNG. A subset of ``--long-candidates`` is also
trained the classic way for ``--long-epochs``: the closest to ground truth this budget allows; both short
rankings are compared with it.

Every trained candidate is appended to ``candidates.jsonl`` in the output folder as it finishes, keyed by
architecture, way, epochs and recipe: a rerun (after an interruption, or with more candidates) trains only
what is missing. The store built without ``--features`` stays there too (``features.zarr``, resumed).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ktnas.cache.errors import KtnasError
from ktnas.cache.precompute import PrecomputeConfig, precompute
from ktnas.cache.runtime import resolve_device
from ktnas.cache.store import open_store
from ktnas.engine.evolve.candidates import CandidateTrainer
from ktnas.engine.evolve.loop import EvolveConfig, resolve_config
from ktnas.engine.evolve.predictor import heldout_tau, kendall_tau
from ktnas.engine.evolve.predictor_dcl import predictor_method
from ktnas.engine.spaces import SPACES, distinct_genotypes, genotype_str

from .loader import add_build_arguments
from .report import Column, Report

HELP = "Kendall tau between architectures trained on cached stem features (KT-NAS) and trained whole on images"
QUICK = dict(candidates=6, samples=320, epochs=1, long_epochs=2, long_candidates=4, batch_size=32, layers=4,
             channels=4, bootstrap=200, top_k=2, folds=2, pretrain_archs=128, pretrain_steps=20)


def add_arguments(p) -> None:
    p.add_argument("--features", default=None, metavar="STORE",
                   help="store of the frozen stem's features (default: built in --out from --samples images)")
    p.add_argument("--space", default="nb201", choices=tuple(SPACES), help="search space (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=24, help="architectures sampled (default: %(default)s)")
    p.add_argument("--samples", type=int, default=4000,
                   help="first N train images: half train each candidate, half validate it (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per candidate, both ways (default: %(default)s)")
    p.add_argument("--long-epochs", type=int, default=8, help="epochs of the classic long budget (default: 8)")
    p.add_argument("--long-candidates", type=int, default=8,
                   help="candidates also trained classic for --long-epochs (default: %(default)s; 0: none)")
    p.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=0.1, help="initial lr, cosine to 0 (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="proxy network cells (default: evolve's proxy)")
    p.add_argument("--channels", type=int, default=None, help="proxy network width (default: evolve's proxy, 16)")
    p.add_argument("--seed", type=int, default=0, help="architectures, split and weights (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the intervals (default: 2000)")
    p.add_argument("--top-k", type=int, default=5, help="size of the top sets compared (default: %(default)s)")
    p.add_argument("--predictors", default="gae,dcl",
                   help="evolve's predictors whose k-fold held-out tau on these labels is reported, on the same folds "
                        "(default: %(default)s; '' for none)")
    p.add_argument("--proxies", default="synflow,snip,grad_norm,jacov,naswot,zico,params,flops",
                   help="zero-cost proxies (ktnas rank) scored on the same architectures and reported against the "
                        "trained labels, with their combined rank (default: %(default)s; '' for none)")
    p.add_argument("--proxy-batches", type=int, default=2, help="minibatches each proxy reads (default: 2)")
    p.add_argument("--folds", type=int, default=4, help="folds of the predictors' held-out tau (default: 4)")
    p.add_argument("--pretrain-archs", type=int, default=4096, help="predictor pre-training architectures (default: "
                                                                   "4096, as evolve)")
    p.add_argument("--pretrain-steps", type=int, default=500, help="predictor pre-training steps (default: 500)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--quick", action="store_true", help="a tiny run (CI): " + ", ".join(f"{k} {v}" for k, v in
                                                                                     QUICK.items()))
    add_build_arguments(p, chunk_size=False)


# ------------------------------------------------------------------------------------------------ statistics
def ranks(x) -> np.ndarray:
    """Ranks 1..n of ``x``, ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        r[tied] = r[tied].mean()
    return r


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's correlation of the (average-tie) ranks; nan when undefined."""
    rx, ry = ranks(x), ranks(y)
    sx, sy = rx.std(), ry.std()
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy)) if sx > 0 and sy > 0 else float("nan")


def bootstrap(fn, x, y, reps: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of ``fn(x[i], y[i])`` over ``reps`` resamples of the pairs (nan ones dropped)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng([seed, 7])
    vals = [fn(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(reps))]
    vals = np.array([v for v in vals if math.isfinite(v)])
    return (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))) if len(vals) else (math.nan, math.nan)


def top_overlap(x, y, k: int) -> float:
    """Share of the top-``k`` of ``x`` that is also in the top-``k`` of ``y`` (higher is better)."""
    k = min(k, len(x))
    top = lambda v: set(np.argsort(-np.asarray(v, dtype=np.float64), kind="mergesort")[:k].tolist())  # noqa: E731
    return len(top(x) & top(y)) / k if k else math.nan


def compare(name: str, x, y, *, reps: int, seed: int, k: int) -> dict:
    """One row: how ranking ``y`` agrees with ranking ``x`` (tau-b, rho, intervals, top-k overlap)."""
    def finite(v):  # undefined (e.g. every accuracy tied) -> None, which JSON keeps and compares
        return v if math.isfinite(v) else None

    def interval(fn):
        lo, hi = bootstrap(fn, x, y, reps, seed)
        return (lo, hi) if math.isfinite(lo) else None

    return dict(comparison=name, n=len(x), kendall_tau=finite(kendall_tau(x, y)), tau_ci=interval(kendall_tau),
                spearman=finite(spearman(x, y)), rho_ci=interval(spearman), top_k=min(k, len(x)),
                top_k_overlap=top_overlap(x, y, k))


# ------------------------------------------------------------------------------------------------ candidates
def sample_architectures(space: str, n: int, seed: int) -> list:
    """``n`` distinct architectures of ``space``, drawn uniformly with a generator seeded by ``seed``."""
    try:
        return distinct_genotypes(space, n, seed)
    except KtnasError as e:
        raise KtnasError(f"{e} (--candidates)") from None


class CandidateLog:
    """``candidates.jsonl``: one line per trained candidate, appended (and synced) as each finishes; a rerun
    finds what was trained under the same recipe. A torn last line (a kill mid-write) is ignored."""

    def __init__(self, path: Path):
        self.path, self.rows = path, {}
        if path.exists():
            text = path.read_text()
            if not text.endswith("\n"):  # a torn last line: cut, so the next line starts on its own
                text = text[:text.rfind("\n") + 1]
                path.write_text(text)
            for line in text.splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.rows[(r["recipe"], r["way"], r["epochs"], r["arch"])] = r

    def get(self, recipe, way, epochs, arch):
        return self.rows.get((recipe, way, epochs, arch))

    def add(self, row: dict) -> None:
        import os

        self.rows[(row["recipe"], row["way"], row["epochs"], row["arch"])] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def recipe_id(args, store) -> str:
    """What a candidate's accuracy depends on besides its architecture, way and epochs: equal ids, equal runs."""
    keys = ("space", "samples", "batch_size", "lr", "layers", "channels", "seed")
    d = {k: getattr(args, k) for k in keys} | dict(stem=store.attrs.get("stem_fingerprint"),
                                                   data=store.attrs.get("dataset_fingerprints", {}).get("train"))
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _config(args, store_path: str, epochs: int) -> EvolveConfig:
    return resolve_config(EvolveConfig(features=store_path, out="-", space=args.space, epochs_per_candidate=epochs,
                                       batch_size=args.batch_size, lr=args.lr, layers=args.layers,
                                       channels=args.channels, limit=args.samples, seed=args.seed,
                                       device=args.device, progress=False))


def train_all(args, store, archs, way: str, epochs: int, log: CandidateLog, recipe: str) -> list[dict]:
    """Every architecture of ``archs`` trained ``way`` ('kt' or 'classic') for ``epochs`` (from the log when
    done before); one row each, in order."""
    todo = [i for i, g in enumerate(archs) if log.get(recipe, way, epochs, genotype_str(g)) is None]
    if todo:
        trainer = CandidateTrainer(_config(args, store.path, epochs), store, resolve_device(args.device),
                                   classic=way == "classic")
        try:
            for n, i in enumerate(todo):
                (r,) = trainer.train([archs[i]], [i])
                row = dict(recipe=recipe, way=way, epochs=epochs, arch=r["arch"], genotype=r["genotype"],
                           val_acc=r["val_acc"], val_loss=r["val_loss"], train_acc=r["train_acc"],
                           diverged=r["diverged"], params=r["params"], flops=r["flops"], seconds=r["seconds"],
                           network=trainer.network_config)
                log.add(row)
                print(f"ktnas bench ranking: {way} {epochs} epoch(s) {n + 1}/{len(todo)}: {r['arch']} val "
                      f"{r['val_acc']:.2f}% ({r['seconds']:.1f} s)", file=sys.stderr)
        finally:
            trainer.close()
    return [log.get(recipe, way, epochs, genotype_str(g)) for g in archs]


def feature_store(args, out: Path) -> tuple[str, float | None]:
    """The store to train KT-NAS candidates on and the seconds its precompute took (None: given, not built)."""
    if args.features is not None:
        return str(args.features), None
    path, timing = out / "features.zarr", out / "precompute.json"
    cfg = PrecomputeConfig(out=str(path), dataset=args.dataset, stem=args.stem, weights=args.weights,
                           image_size=args.image_size, splits=("train",), limit=args.samples,
                           resume=path.exists(), progress=False)
    t0 = time.perf_counter()
    made = precompute(cfg)
    done, total = made["chunks_written"], made["chunks_total"]
    if done and (done == total or not timing.exists()):  # a resumed build: its rate scaled to the whole store
        timing.write_text(json.dumps(dict(seconds=(time.perf_counter() - t0) * total / done, scaled=done < total)))
    return str(path), float(json.loads(timing.read_text())["seconds"]) if timing.exists() else None


# ------------------------------------------------------------------------------------------------- the bench
def bench_ranking(args, out: Path) -> tuple[list[dict], dict]:
    """(comparison rows, details: candidates, costs) of one ranking run (see the module docstring)."""
    for name in ("candidates", "samples", "epochs", "long_epochs", "batch_size", "bootstrap", "top_k", "folds",
                 "pretrain_archs", "pretrain_steps"):
        v = getattr(args, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KtnasError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    if not 0 <= args.long_candidates <= args.candidates:
        raise KtnasError(f"--long-candidates must lie in 0..--candidates ({args.candidates}), got "
                         f"{args.long_candidates}")
    if args.candidates < 3:
        raise KtnasError("a ranking needs 3 candidates or more: pass --candidates 3 or more (24 for a figure)")
    out.mkdir(parents=True, exist_ok=True)
    path, precompute_s = feature_store(args, out)
    archs = sample_architectures(args.space, args.candidates, args.seed)
    log = CandidateLog(out / "candidates.jsonl")
    with open_store(path) as store:
        recipe = recipe_id(args, store)
        kt = train_all(args, store, archs, "kt", args.epochs, log, recipe)
        cl = train_all(args, store, archs, "classic", args.epochs, log, recipe)
        sub = archs[:args.long_candidates]
        long = train_all(args, store, sub, "classic", args.long_epochs, log, recipe) if sub else []
    acc = lambda rows: [r["val_acc"] for r in rows]  # noqa: E731
    kw = dict(reps=args.bootstrap, seed=args.seed, k=args.top_k)
    rows = [compare(f"KT-NAS vs classic, both {args.epochs} epoch(s)", acc(cl), acc(kt), **kw)]
    chance = 150.0 / int(store.attrs.get("num_classes") or 10)  # 1.5x chance: a cell that learns nothing
    live = [i for i in range(len(kt)) if max(kt[i]["val_acc"], cl[i]["val_acc"]) > chance]
    if 3 <= len(live) < len(kt):  # architectures whose cells pass nothing (NB201 'none' paths) tie at chance
        rows.append(compare(f"the same without the {len(kt) - len(live)} at chance both ways",
                            [cl[i]["val_acc"] for i in live], [kt[i]["val_acc"] for i in live], **kw))
    if len(long) >= 3:
        k = len(long)
        rows += [compare(f"KT-NAS {args.epochs} ep vs classic {args.long_epochs} ep", acc(long), acc(kt[:k]), **kw),
                 compare(f"classic {args.epochs} ep vs classic {args.long_epochs} ep", acc(long), acc(cl[:k]), **kw)]
    rows += predictor_rows(args, dict(zip(("KT-NAS", "classic"), (kt, cl))))
    proxies = proxy_scores(args, path, archs, out / "rank") if args.proxies else {}
    rows += proxy_rows(proxies, dict(zip(("KT-NAS", "classic", f"classic {args.long_epochs} ep"), (kt, cl, long))),
                       **kw)
    sec = lambda rows: float(np.mean([r["seconds"] for r in rows]))  # noqa: E731
    costs = dict(kt_seconds=sec(kt), classic_seconds=sec(cl), long_seconds=sec(long) if long else None,
                 precompute_seconds=precompute_s,
                 kt_seconds_with_precompute=sec(kt) + (precompute_s or 0.0) / len(archs))
    costs["proxy_seconds"] = {n: v["seconds"] for n, v in proxies.items()}
    details = dict(candidates=dict(kt=kt, classic=cl, classic_long=long), costs=costs, recipe=recipe,
                   store=path, kt_network=kt[0]["network"], classic_network=cl[0]["network"])
    return rows, details


def proxy_scores(args, store_path: str, archs: list, out: Path) -> dict:
    """{proxy: {scores (aligned with ``archs``), seconds per architecture}} from ``ktnas rank`` on the same store,
    architectures, network size and seed (its scores stay in ``out``; a rerun reuses them); plus "combined", the
    proxies' ranks aggregated as AZ-NAS does (Σ log(rank / n), params and flops left out)."""
    from ktnas.engine.rank.run import BASELINES, rank

    r = rank(features=store_path, out=str(out), space=args.space, sample=len(archs), seed=args.seed,
             proxy=args.proxies, batches=args.proxy_batches, batch_size=args.batch_size, layers=args.layers,
             channels=args.channels, device=args.device, resume=(out / "scores.jsonl").exists(), progress=False)
    assert [x["arch"] for x in r["rows"]] == [genotype_str(g) for g in archs]
    found = {n: dict(scores=[x["scores"][n] for x in r["rows"]], seconds=r["seconds_per_architecture"][n])
             for n in r["proxies"]}
    zero_cost = [n for n in found if n not in BASELINES]
    if len(zero_cost) > 1:
        n = len(archs)
        found["combined"] = dict(scores=list(sum(np.log(ranks(found[p]["scores"]) / n) for p in zero_cost)),
                                 seconds=sum(found[p]["seconds"] for p in zero_cost))
    return found


def proxy_rows(proxies: dict, labelled: dict, **kw) -> list[dict]:
    """How each proxy's scores rank the architectures against each set of trained labels."""
    rows = []
    for label, cands in labelled.items():
        acc = [c["val_acc"] for c in cands]
        for name, p in proxies.items():
            if len(acc) >= 3:
                rows.append(dict(compare(f"proxy {name} vs {label} labels", acc, p["scores"][:len(acc)], **kw),
                                 seconds=p["seconds"]))
    return rows


def predictor_rows(args, labelled: dict) -> list[dict]:
    """For each of ``--predictors``: its ``--folds``-fold held-out Kendall tau on each labelled set (the same folds
    for every predictor: they depend on the seed only), as rows of the report (interval: mean +- 1.96 SE)."""
    rows = []
    for name in (x for x in args.predictors.split(",") if x):
        pretrain, fit = predictor_method(name)
        pre = pretrain(args.space, archs=args.pretrain_archs, steps=args.pretrain_steps, seed=args.seed)
        for label, cands in labelled.items():
            t = heldout_tau(pre, args.space, cands, folds=args.folds, seed=args.seed, fit=fit)
            if t is None:
                raise KtnasError(f"{len(cands)} candidates are too few for {args.folds}-fold held-out tau: pass "
                                 f"--candidates {3 * args.folds} or more, or fewer --folds")
            tau, se = t["kendall_tau"], t["stderr"]
            ci = (tau - 1.96 * se, tau + 1.96 * se) if math.isfinite(se) and math.isfinite(tau) else None
            rows.append(dict(comparison=f"predictor {name}: {args.folds}-fold held-out, {label} labels",
                             n=len(cands), kendall_tau=tau if math.isfinite(tau) else None, tau_ci=ci,
                             spearman=None, rho_ci=None, top_k=0, top_k_overlap=None, folds=t["folds"]))
    return rows


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def _num(v) -> str:
    return f"{v:+.3f}" if _finite(v) else "-"


def _interval(v) -> str:
    return f"[{v[0]:+.2f}, {v[1]:+.2f}]" if v is not None and all(map(_finite, v)) else "-"


COLUMNS = [Column("comparison", "comparison"), Column("n", "candidates"),
           Column("kendall_tau", "Kendall tau-b", _num), Column("tau_ci", "tau 95% CI", _interval),
           Column("spearman", "Spearman rho", _num), Column("rho_ci", "rho 95% CI", _interval),
           Column(None, "top-k overlap", lambda r: f"{r['top_k_overlap']:.2f} (k={r['top_k']})" if r["top_k"] else "-"),
           Column(None, "seconds per architecture", lambda r: f"{r['seconds']:.3f}" if "seconds" in r else "")]


def _chart(axes, rows, details=None) -> None:
    c = details["candidates"]
    x, y = [r["val_acc"] for r in c["classic"]], [r["val_acc"] for r in c["kt"]]
    axes[0].scatter(x, y, s=18, color="tab:blue")
    axes[0].set_xlabel("classic: whole network with its conv stem on images, val acc %")
    axes[0].set_ylabel("KT-NAS: cells on cached stem features, val acc %")
    axes[0].set_title(f"{rows[0]['n']} architectures: tau {rows[0]['kendall_tau']:+.2f}", fontsize=9)
    long = c["classic_long"]
    if long:
        lx = [r["val_acc"] for r in long]
        axes[1].scatter(lx, y[:len(lx)], s=18, color="tab:blue", label="KT-NAS short")
        axes[1].scatter(lx, x[:len(lx)], s=18, marker="x", color="tab:orange", label="classic short")
        axes[1].set_xlabel(f"classic, {long[0]['epochs']} epochs (the long budget), val acc %")
        axes[1].set_ylabel("short-budget val acc %")
        axes[1].legend(fontsize=8)
    axes[1].set_title("short budgets against the long one", fontsize=9)


def report(args, work_dir=None) -> Report:
    """Run :func:`bench_ranking` with the CLI's arguments (``--quick``: the tiny sizes of :data:`QUICK`)."""
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    rows, details = bench_ranking(args, Path(work_dir or "runs/bench-ranking"))
    c, kt, cl = details["costs"], details["kt_network"], details["classic_network"]
    share = "" if c["precompute_seconds"] is None else (
        f"; with its share of the precompute ({c['precompute_seconds']:.1f} s over {args.candidates}) "
        f"{c['kt_seconds_with_precompute']:.2f} s")
    notes = [f"space {args.space}, {args.candidates} architectures sampled with seed {args.seed}; recipe: "
             f"{args.samples} train images (half train, half validate), batch {args.batch_size}, SGD lr {args.lr} "
             f"cosine, {args.epochs} epoch(s); long budget: the first {len(details['candidates']['classic_long'])} "
             f"trained classic for {args.long_epochs} epochs",
             f"networks: KT-NAS {kt} on the store's features; classic {cl} with its conv stem on the images at "
             "their native size (28 px Fashion-MNIST, 32 px CIFAR; image folders at 32 px)",
             f"cost per candidate: KT-NAS {c['kt_seconds']:.2f} s{share}; classic {c['classic_seconds']:.2f} s "
             f"({c['classic_seconds'] / c['kt_seconds']:.1f}x KT-NAS)"
             + ("" if c["long_seconds"] is None else f"; classic long {c['long_seconds']:.2f} s"),
             f"intervals: 95% percentile bootstrap over {args.bootstrap} resamples of the candidates; every "
             "candidate's numbers are in candidates.jsonl beside this report (a rerun reuses them)"]
    return Report("ranking", "ktnas bench ranking: do cached stem features rank architectures as classic training?",
                  rows, COLUMNS, lambda axes, r: _chart(axes, r, details), device=str(resolve_device(args.device)),
                  notes=notes, chart_panels=2)
