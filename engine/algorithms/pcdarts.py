"""PC-DARTS (Xu et al. 2020): DARTS with partial channels and edge normalisation, the alphas frozen at first."""
from __future__ import annotations

import dataclasses
from dataclasses import field

from ktnas.engine.algorithms.base import DARTS_DEFAULTS, Algorithm, register_algorithm
from ktnas.engine.algorithms.darts import Darts

WARMUP, EPOCHS = 15, 50  # PC-DARTS freezes the alphas for the first 15 of its 50 epochs


@dataclasses.dataclass
class PCDartsOptions:
    """PC-DARTS' warm-up and partial-channel factor (it searches first order only)."""
    warmup: int | None = field(default=None, metadata=dict(min=0, help=(
        "epochs before the architecture parameters train (default: PC-DARTS' 15 of 50, floor(0.3 x epochs) for "
        "other epoch counts, at most 15)")))
    pc_k: int = field(default=4, metadata=dict(help="1/K of each edge's channels enter the mixed op"))


@register_algorithm
class PCDarts(Darts):
    """K=``pc_k`` (4): 1/K of each edge's channels go through the mixed op, the rest bypass it, then channel
    shuffle; edge normalisation (``beta_*``, a softmax per node over its incoming edges), the genotype ranked by
    softmax(alpha) * edge weight. The alphas are frozen for the first ``warmup`` epochs: PC-DARTS' 15 of 50; for
    other epoch counts the same fraction, floor(0.3 * epochs) (so 0 for 1-3 epochs)."""
    name = "pcdarts"
    defaults = dict(DARTS_DEFAULTS, batch_size=256, lr=0.1, lr_min=0.0, arch_lr=6e-4)  # PC-DARTS train_search.py
    Options = PCDartsOptions
    variants = None
    paper_warmup = WARMUP
    arch_step = Algorithm.arch_step  # first order

    @classmethod
    def resolve(cls, cfg, opts):
        if opts.warmup is None:
            opts.warmup = min(WARMUP, WARMUP * cfg.epochs // EPOCHS)
        super().resolve(cfg, opts)

    @classmethod
    def supernet_options(cls, cfg):
        return dict(k=cfg.options["pc_k"], edge_norm=True)
