"""How the architecture parameters learn at the search's budget: the papers' schedule, or the short-budget one.

The papers' hyper-parameters were set for their budgets: DARTS trains the alphas with Adam at 3e-4 for 50 epochs
of 391 steps (19,550 steps), GDAS for 250 epochs (97,750). Adam moves a parameter by about its learning rate per
step, so at a few hundred steps the same rate leaves the alphas where they started (softmax uniform to four
digits) and the derived genotype is decided by noise. The short-budget schedule keeps the papers' total movement:

* the weights train alone for the first quarter of the epochs (a warm-up, as P-DARTS and PC-DARTS do; a longer
  ``--warmup`` is kept), so the alphas are compared on weights that have learnt something;
* the architecture learning rate is the paper's times (the paper's architecture steps / this run's), so the
  alphas can move as far in this run's steps as in the paper's, up to 0.1 (below about 60 architecture steps
  the paper's movement would need larger steps, each of which Adam takes whatever the gradient's size: the
  sign of a gradient that is mostly noise would decide); an ``--arch-lr`` other than the paper's is kept as
  given.

``--schedule auto`` (the default) takes it when the run has under a tenth of its paper's architecture steps,
``paper`` never, ``short`` always. What was chosen, and why, is recorded in ``config.json`` and printed.
"""
from __future__ import annotations

import dataclasses
import math

SCHEDULES = ("auto", "paper", "short")
PAPER_TRAIN_SAMPLES = 25_000  # the papers' search-train half of CIFAR-10's 50,000 training images
SHORT_BELOW = 0.1  # auto: short when the run's architecture steps are under this share of the paper's
WARMUP_SHARE = 0.25  # short: the share of the epochs the weights train alone
MAX_ARCH_LR = 0.1  # short: the scaled rate's ceiling (Adam then moves a logit by at most a tenth per step)


def paper_arch_steps(algo) -> int:
    """The architecture steps of ``algo``'s own search: its epochs (less its warm-up) times CIFAR-10's
    search-train half in batches of its batch size."""
    d = algo.defaults
    epochs = d["epochs"] - algo.paper_warmup
    return epochs * math.ceil(PAPER_TRAIN_SAMPLES / d["batch_size"])


def plan(cfg, algo, steps_per_epoch: int) -> tuple[object, dict]:
    """(cfg with the short-budget schedule applied where chosen, the record of the choice). ``cfg`` is resolved;
    ``steps_per_epoch``: this run's steps per epoch (per rank)."""
    def arch_steps(cfg) -> tuple[int, int]:  # (warm-up epochs, architecture steps after them)
        warmup = algo.arch_start(cfg)
        return warmup, max(1, (cfg.epochs - warmup) * steps_per_epoch)

    paper = paper_arch_steps(algo)
    warmup, steps = arch_steps(cfg)
    record = dict(requested=cfg.schedule, used="paper", arch_steps=steps, paper_arch_steps=paper,
                  arch_lr=cfg.arch_lr, warmup_epochs=warmup)
    if not algo.uses_arch_optimizer:
        record.update(why=f"{algo.name} has no architecture optimiser")
        return cfg, record
    short = cfg.schedule == "short" or (cfg.schedule == "auto" and steps < SHORT_BELOW * paper)
    if not short:
        record.update(why=("--schedule paper" if cfg.schedule == "paper" else
                           f"{steps:,} architecture steps, {steps / paper:.0%} of the paper's {paper:,}"))
        return cfg, record
    if "warmup" in cfg.options:  # a longer warm-up asked for (or PC-DARTS' own) is kept
        options = dict(cfg.options, warmup=max(cfg.options["warmup"] or 0, int(cfg.epochs * WARMUP_SHARE)))
        cfg = dataclasses.replace(cfg, options=options)
    warmup, steps = arch_steps(cfg)
    own = cfg.arch_lr != algo.defaults.get("arch_lr")
    arch_lr = cfg.arch_lr if own else min(MAX_ARCH_LR, cfg.arch_lr * paper / steps)
    record.update(used="short", arch_steps=steps, warmup_epochs=warmup, arch_lr=arch_lr, arch_lr_given=own,
                  why=("--schedule short" if cfg.schedule == "short" else
                       f"{steps:,} architecture steps, under {SHORT_BELOW:.0%} of the paper's {paper:,}"))
    return dataclasses.replace(cfg, arch_lr=arch_lr), record


def describe(record: dict) -> str:
    """One line for the log: the schedule used, its warm-up and architecture learning rate, and why."""
    if record["used"] == "short":
        rate = ("--arch-lr as given" if record["arch_lr_given"] else
                f"the paper's x its architecture steps / this run's, {record['paper_arch_steps']:,}/"
                f"{record['arch_steps']:,}" + (f", at most {MAX_ARCH_LR}" if record["arch_lr"] == MAX_ARCH_LR else ""))
        return (f"short-budget schedule ({record['why']}): the weights alone for {record['warmup_epochs']} "
                f"epoch(s), then the alphas at Adam lr {record['arch_lr']:.3g} ({rate}); --schedule paper keeps the "
                f"paper's")
    return f"the paper's schedule ({record['why']})"
