"""``ktnas evolve``: sample-based architecture search on cached stem features, every candidate trained for real.

Once the frozen stem's features are cached, a stand-alone candidate network costs only its own cells, so the
second family of NAS algorithms, where each candidate is trained and measured, becomes cheap as well. One Python
call, :func:`evolve` (``EvolveConfig`` -> summary dict); the CLI's flags are generated from the config. The
proposers (``ktnas.engine.evolve.proposers``: random, regularized evolution, predictor-guided) say what to train next,
``ktnas.engine.evolve.candidates`` trains it, ``ktnas.engine.evolve.predictor`` is the learned ranker; this module is
the loop (budget ``population + cycles``, groups of ``parallel`` candidates, run directory, resume). Every draw of the
group starting at candidate i comes from a generator seeded by (seed, i), so a resumed run ends with exactly the
history of an uninterrupted one. docs/guides/evolve.md documents the algorithms and the run directory.
"""
from __future__ import annotations

import dataclasses
import math
import datetime
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import DEFAULT_OUT, resolve_device

from ktnas.engine.evolve.candidates import CandidateTrainer
from ktnas.cache.flags import add_config_arguments, check_positive, config_from_args, option
from ktnas.engine.evolve.predictor import (ArchPredictor, arch_graph, fit_ranker, heldout_tau, kendall_tau,
                                           predict_scores, pretrain_predictor)
from ktnas.engine.evolve.predictor_dcl import PREDICTORS, predictor_method
from ktnas.engine.data import feature_info
from ktnas.engine.evolve.front import cost_objectives, front_text, pareto_front, plot_front
from ktnas.engine.evolve.proposers import PROPOSERS, PredictorProposer, best_of
from ktnas.engine.evolve.screen import screen
from ktnas.engine.search.budget import SearchBudget, budget_model, parse_budget
from ktnas.engine.runs import RunDir, atomic_write, progress, set_rng_state
from ktnas.engine.spaces import SPACES, get_space, space_of

__all__ = ["EvolveConfig", "evolve", "mutate", "arch_graph", "ArchPredictor", "pretrain_predictor", "fit_ranker",
           "predict_scores", "heldout_tau", "kendall_tau", "CandidateTrainer", "plot_accuracy", "add_evolve_parser"]

ALGOS = tuple(PROPOSERS)
NOT_COMPARED = ("stop_after", "device", "workers", "cycles")  # a resumed run may change these (a larger --cycles
# extends it), and out, resume, progress


def mutate(genotype, rng: np.random.Generator):
    """A child of ``genotype`` differing in one place: (child, description) (its space's mutation)."""
    return space_of(genotype).mutate(genotype, rng)


@dataclass
class EvolveConfig:
    """Everything ``ktnas evolve`` takes. ``layers``/``channels`` None: the space's proxy network (its ``proxy``:
    NB201 2 cells per stage, DARTS 8 cells, C=16, minus what the stem replaces); ``parallel`` None: 1 on the CPU, 8 on
    CUDA (a resumed run keeps its own)."""

    features: str = option(DEFAULT_OUT, "feature store")
    out: str = option("runs/evolve", "run directory", required=True)
    space: str = option("nb201", "search space (a registered one)")
    algo: str = option("rea", "proposer", choices=ALGOS)
    budget: str | None = option(None, "propose only genotypes whose model (the network ktnas train builds at "
                                      "--train-layers/--train-channels, frozen stem included) fits: "
                                      "params=1.5M,flops=300M,latency=4ms", metavar="KEY=VALUE,...")
    objectives: str = option("accuracy", "accuracy, or accuracy and costs of that model (accuracy,latency; "
                                         "accuracy,params,flops): a Pareto front is kept and tournaments are won "
                                         "on it; pareto.png shows it", metavar="NAMES")
    train_layers: int | None = option(None, "with --budget or cost objectives: the cells of the network the found "
                                            "genotypes will be trained in (ktnas train --layers; default: its "
                                            "default)")
    train_channels: int | None = option(None, "with --budget or cost objectives: its first cells' width")
    latency_table: str | None = option(None, "the `ktnas bench latency` table of that network for latency budgets "
                                             "and objectives (default: measured now on the CPU with onnxruntime)",
                                       metavar="FILE")
    population: int = option(20, "P: initial random candidates and the aging population's size")
    proxy: str | None = option(None, "screen the initial population: draw --proxy-pool architectures, score each "
                                     "by this zero-cost proxy (ktnas rank: synflow, snip, grad_norm, jacov, naswot, "
                                     "zico, params, flops) and train the best P")
    proxy_pool: int = option(100, "with --proxy: architectures drawn and scored")
    sample: int = option(5, "S: tournament size")
    cycles: int = option(80, "candidates trained after the initial population; budget P + N")
    epochs_per_candidate: int = 1
    batch_size: int = 128
    lr: float = option(0.1, "cosine to 0 over a candidate's steps")
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 5.0
    layers: int | None = option(None, "candidate size: cells built (NB201: ResNet blocks included); "
                                      "default: the proxy network minus what the stem replaces")
    channels: int | None = option(None, "candidate size: width of the first cells")
    train_portion: float = option(0.5, "of the train split for candidate training, the rest validates")
    limit: int | None = option(None, "first N samples of the train split only")
    parallel: int | None = option(None, "candidates trained at once in lock-step (default: 1 on CPU, "
                                        "8 on CUDA); the predictor trains this many per cycle")
    pool: int = option(100, "predictor: children ranked per cycle")
    pretrain_archs: int = option(4096, "predictor: sampled architectures of the unsupervised "
                                       "pre-training")
    pretrain_steps: int = 500
    fit_steps: int = option(200, "predictor: ranking-loss steps per fit")
    hidden: int = option(32, "predictor: graph network width")
    predictor: str = option("gae", "predictor: gae (masked graph autoencoder pre-training, margin "
                                   "ranking loss) | dcl (DCL-ENAS: contrastive pre-training, "
                                   "contrastive ranking fine-tuning)", choices=PREDICTORS)
    cv_folds: int = option(5, "predictor: folds of the held-out Kendall tau at the end (0: none)")
    seed: int = 0
    device: str = option("auto", "auto | cpu | cuda")
    resume: bool = option(False, "continue the run in --out (a larger --cycles extends it)")
    stop_after: int | None = option(None, "stop once this many candidates are trained (continue: "
                                          "--resume)")
    on_the_fly: bool = option(False, "train candidates on augmented images through the frozen stem "
                                     "instead of cached features")
    dataset: str | None = option(None, "images for --on-the-fly (default: the store's data set)")
    data_root: str | None = option(None, "folder with the data set's files")
    workers: int = option(2, "feature reader threads")
    progress: bool = option(True, "no progress bars", flag="quiet")


def resolve_config(cfg: EvolveConfig) -> EvolveConfig:
    """A copy of ``cfg`` with the proxy size filled in and every value checked (one-line KtnasError)."""
    cfg = dataclasses.replace(cfg)
    get_space(cfg.space)
    parse_budget(cfg.budget)  # a malformed budget is refused before anything runs
    cost_objectives(cfg.objectives)
    if cfg.proxy is not None:
        from ktnas.engine.rank.run import proxies_of

        if len(proxies_of(cfg.proxy)) != 1:
            raise KtnasError(f"--proxy {cfg.proxy!r}: name one proxy")
        if cfg.proxy_pool < cfg.population:
            raise KtnasError(f"--proxy-pool {cfg.proxy_pool} is smaller than --population {cfg.population}: the "
                             "screening keeps the best P of the pool, pass --proxy-pool >= --population")
        if cfg.proxy == "zico" and cfg.limit is not None and cfg.limit < 4 * cfg.batch_size:
            raise KtnasError("--proxy zico reads 2 minibatches of the candidate-train part: raise --limit")
    if cfg.algo not in ALGOS:
        raise KtnasError(f"unknown --algo {cfg.algo!r}: use one of {', '.join(ALGOS)}")
    if not cfg.features:
        raise KtnasError("no feature store given: pass --features STORE (made by ktnas precompute-features)")
    check_positive(cfg, ("population", "sample", "epochs_per_candidate", "batch_size", "pool", "pretrain_archs",
                         "pretrain_steps", "fit_steps", "hidden", "workers"))
    for name, low in (("cycles", 0), ("cv_folds", 0), ("parallel", 1), ("stop_after", 1), ("limit", 2),
                      ("layers", 1), ("channels", 1)):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise KtnasError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
    if cfg.algo != "random" and cfg.sample > cfg.population:
        raise KtnasError(f"--sample {cfg.sample} exceeds --population {cfg.population}: a tournament draws from the "
                         "population, pass --sample <= --population")
    if cfg.algo == "predictor" and cfg.population < 2:
        raise KtnasError("--algo predictor learns from pairs of candidates: pass --population 2 or more")
    if cfg.cv_folds == 1:
        raise KtnasError("--cv-folds 1 leaves nothing to fit on: pass 0 (no held-out tau) or 2 or more")
    if cfg.parallel is not None and cfg.algo == "predictor" and cfg.parallel > cfg.pool:
        raise KtnasError(f"--parallel {cfg.parallel} exceeds --pool {cfg.pool}: the predictor picks the candidates "
                         "of a cycle from its pool, pass --pool >= --parallel")
    if not 0 < cfg.train_portion < 1:
        raise KtnasError(f"--train-portion must lie strictly between 0 and 1, got {cfg.train_portion}")
    for name in ("lr", "momentum", "weight_decay", "grad_clip"):
        v = getattr(cfg, name)
        positive = name in ("lr", "grad_clip")
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            kind = "positive" if positive else "non-negative"
            raise KtnasError(f"--{name.replace('_', '-')} must be a {kind} number, got {v}")
    return cfg


class Evolution:
    """One evolve run: the history of evaluated candidates, the proposer, the trainer, the run directory."""

    def __init__(self, cfg: EvolveConfig, store, device, state: dict | None, files: RunDir):
        self.cfg, self.device, self.space, self.files = cfg, device, get_space(cfg.space), files
        self.out = files.path
        self.history: list[dict] = list(state["history"]) if state else []
        self.pretrained = state.get("pretrained") if state else None
        self.tau = state.get("tau") if state else None
        self.screened = state.get("screened") if state else None  # --proxy: the screened initial population
        self.seconds_total = float(state.get("seconds_total", 0.0)) if state else 0.0
        if state is not None:
            set_rng_state(state["rng"])
        self.trainer, self.store = CandidateTrainer(cfg, store, device), store
        self.objectives = cost_objectives(cfg.objectives)
        limits = parse_budget(cfg.budget)
        self.costs, self.cost = None, None  # the deployed model's costs; the budget (None without --budget)
        if limits or self.objectives:
            self.costs = budget_model(self.space, feature_info(store), True, store=store, layers=cfg.train_layers,
                                      channels=cfg.train_channels,
                                      latency="latency" in (*limits, *self.objectives),
                                      latency_table=cfg.latency_table, out=cfg.out, progress=cfg.progress)
        if limits:
            self.cost = SearchBudget(self.space, limits, self.costs, "cpu")

    @property
    def budget(self) -> int:
        return self.cfg.population + self.cfg.cycles

    def proposer(self):
        cfg = self.cfg
        p = PredictorProposer(cfg, self.pretrained) if cfg.algo == "predictor" else PROPOSERS[cfg.algo](cfg)
        p.budget, p.costs = self.cost, self.objectives
        p.screened = (self.screened or {}).get("chosen")
        return p

    def summary(self) -> dict:
        h, cfg = self.history, self.cfg
        best = best_of(h)
        curve = list(np.maximum.accumulate([r["val_acc"] for r in h])) if h else []
        train_s = sum(r["seconds"] for r in h)
        initial = h[:cfg.population]
        return dict(
            out=str(self.out), algo=cfg.algo, space=cfg.space, candidates=len(h), budget=self.budget,
            complete=len(h) >= self.budget,
            best=None if best is None else {k: best[k] for k in ("index", "arch", "val_acc", "val_loss", "params",
                                                                 "flops", "origin")},
            genotype=None if best is None else best["genotype"],
            initial_best_acc=max(r["val_acc"] for r in initial) if initial else None,
            best_so_far=[float(v) for v in curve], seconds_training=train_s, seconds_total=self.seconds_total,
            candidates_per_hour=3600 * len(h) / train_s if train_s > 0 else None,
            candidates_per_hour_total=3600 * len(h) / self.seconds_total if self.seconds_total > 0 else None,
            data=self.trainer.data, predictor=self.tau, machine=machine(self.device),
            objectives=["accuracy", *self.objectives],
            screening=None if not self.screened else {k: self.screened[k] for k in ("proxy", "pool", "seconds")},
            front=[{k: h[i][k] for k in ("index", "arch", "val_acc", "deploy", "genotype")}
                   for i in pareto_front(h, self.objectives)] if self.objectives and h else None,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    def write(self, picture: bool) -> dict:
        files, h = self.files, self.history
        s = self.summary()
        files.write_jsonl("candidates.jsonl", h)
        if s["genotype"] is not None:
            files.write_json("genotype.json", s["genotype"])
        files.write_json("results.json", s)
        if self.objectives and h:
            files.write_json("front.json", s["front"])
        if picture and h:
            plot_accuracy({self.cfg.algo: h}, files.file("accuracy.png"), population=self.cfg.population,
                          title=f"ktnas evolve --algo {self.cfg.algo} --space {self.cfg.space}")
            if self.objectives:
                plot_front(h, s["front"], self.objectives, files.file("pareto.png"),
                           title=f"ktnas evolve --algo {self.cfg.algo} --space {self.cfg.space}: Pareto front")
        return s

    def checkpoint(self):
        self.files.save_checkpoint(dict(history=self.history, pretrained=self.pretrained, tau=self.tau,
                                        screened=self.screened, seconds_total=self.seconds_total), asdict(self.cfg))

    def group(self, proposer) -> list[dict]:
        """Propose, train and record the next group of candidates."""
        cfg, start = self.cfg, len(self.history)
        limit = cfg.population if start < cfg.population else self.budget
        k = min(cfg.parallel, limit - start)
        proposals = proposer.propose(self.history, k, np.random.default_rng([cfg.seed, start]))
        rows = self.trainer.train([g for g, _ in proposals], range(start, start + k))
        for row, (g, meta) in zip(rows, proposals):
            row.update(dict(origin=None, parent=None, mutation=None, predicted=None), **meta)
            if self.costs is not None:  # the model ktnas train builds from it: weights, multiply-adds, latency
                row["deploy"] = self.costs.values(g)
        self.history += rows
        return rows

    def run(self) -> dict:
        cfg, files = self.cfg, self.files
        t_session = time.perf_counter()
        if cfg.algo == "predictor" and self.pretrained is None:
            pretrain = predictor_method(cfg.predictor)[0]
            self.pretrained = pretrain(cfg.space, archs=cfg.pretrain_archs, steps=cfg.pretrain_steps,
                                       hidden=cfg.hidden, seed=cfg.seed, progress=cfg.progress)
        if cfg.proxy and self.screened is None:
            self.screened = screen(cfg, self.store, self.device, self.cost, cfg.progress)
            self.checkpoint()
        files.write_json("config.json", dict(asdict(cfg), network_config=self.trainer.network_config,
                                             data=self.trainer.data, budget=self.budget,
                                             device_resolved=str(self.device)))
        end = self.budget if cfg.stop_after is None else min(self.budget, cfg.stop_after)
        bar = progress(total=self.budget, initial=min(len(self.history), self.budget), desc=f"evolve {cfg.algo}",
                       unit="cand", enabled=cfg.progress)
        groups, proposer = 0, self.proposer()
        try:
            while len(self.history) < end:
                rows = self.group(proposer)
                done = len(self.history) >= end
                if done and cfg.algo == "predictor" and len(self.history) >= self.budget and cfg.cv_folds:
                    self.tau = heldout_tau(self.pretrained, cfg.space, self.history, folds=cfg.cv_folds,
                                           steps=cfg.fit_steps, hidden=cfg.hidden, seed=cfg.seed,
                                           fit=predictor_method(cfg.predictor)[1])
                    if self.tau is not None:
                        self.tau["predictor"] = cfg.predictor
                self.seconds_total += time.perf_counter() - t_session
                t_session = time.perf_counter()
                groups += 1
                self.write(picture=done or groups % 10 == 0)
                self.checkpoint()
                bar.update(len(rows))
                bar.set_postfix(best=f"{best_of(self.history)['val_acc']:.2f}", last=f"{rows[-1]['val_acc']:.2f}")
        finally:
            bar.close()
            self.trainer.close()
        if groups == 0:  # nothing left to do (a finished or stopped run resumed): refresh the files
            self.write(picture=bool(self.history))
            if not files.checkpoint_path.exists():
                self.checkpoint()
        return self.summary()


def machine(device) -> dict:
    return dict(node=platform.node(), processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                threads=torch.get_num_threads(), device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, torch=torch.__version__)


def evolve(cfg: EvolveConfig | None = None, **overrides) -> dict:
    """Run the configured sample-based search; returns the summary that ``results.json`` holds: best candidate
    and genotype, best-so-far curve, candidates per hour, predictor tau."""
    from ktnas.cache.store import open_store

    cfg = resolve_config(dataclasses.replace(cfg or EvolveConfig(), **overrides))
    files = RunDir(cfg.out, "evolve run", resume=cfg.resume, ignore=NOT_COMPARED)
    state = files.read_checkpoint()
    if state is not None:
        old = state.get("config", {})
        if cfg.parallel is None:
            cfg.parallel = old.get("parallel")
        files.check_config(old, asdict(cfg))
    device = resolve_device(cfg.device)
    if cfg.parallel is None:
        cfg.parallel = 8 if device.type == "cuda" else 1
    store = open_store(cfg.features)
    try:
        return Evolution(cfg, store, device, state, files).run()
    finally:
        store.close()


# ------------------------------------------------------------------------------------------------- picture
def plot_accuracy(runs: dict[str, list[dict]], path, population: int | None = None, title: str = "") -> None:
    """Validation accuracy of every evaluated candidate (points) and the best so far (line) over the candidates
    trained, one colour per run (e.g. per algorithm); a dotted line where the initial population ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, (label, h) in enumerate(runs.items()):
        x = np.arange(1, len(h) + 1)
        acc = np.array([r["val_acc"] for r in h])
        ax.scatter(x, acc, s=10, color=f"C{c}", alpha=0.45)
        ax.step(x, np.maximum.accumulate(acc), where="post", color=f"C{c}", lw=2,
                label=f"{label}: best {acc.max():.2f}%")
    if population:
        ax.axvline(population + 0.5, color="grey", ls=":", lw=1, label="end of the initial population")
    ax.set_xlabel("candidates trained")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- CLI
def cmd_evolve(args) -> int:
    """``ktnas evolve``: map the flags onto an EvolveConfig and run :func:`evolve`."""
    s = evolve(config_from_args(EvolveConfig, args))
    b = s["best"] or {}
    rate = f", {s['candidates_per_hour']:.0f} candidates/hour" if s["candidates_per_hour"] else ""
    tau = s["predictor"]
    tau = f"; predictor held-out Kendall tau {tau['kendall_tau']:.3f} +- {tau['stderr']:.3f}" if tau else ""
    state = f"genotype {s['out']}/genotype.json" if s["complete"] else \
        f"stopped after {s['candidates']}/{s['budget']} candidates: continue with --resume"
    print(f"{s['out']}: {s['candidates']} candidates ({s['algo']}, {s['space']}), best validation accuracy "
          f"{b.get('val_acc', float('nan')):.2f}% (#{b.get('index')}: {b.get('arch')}){rate}{tau}; {state}")
    if s.get("front"):
        print(front_text(s))
    return 0


def add_evolve_parser(subparsers):
    """Add the ``evolve`` subcommand (``func=cmd_evolve``) to an argparse subparsers object."""
    s = subparsers.add_parser("evolve", help="sample-based search (random, regularized evolution, predictor-guided): "
                                             "every candidate trained on cached features",
                              description="Evolutionary and predictor-guided search on a feature store: each "
                                          "candidate network is trained for real, at the cost of its cells alone.")
    add_config_arguments(s, EvolveConfig, overrides=dict(space=dict(choices=tuple(SPACES))))  # those registered now
    s.set_defaults(func=cmd_evolve)
    return s
