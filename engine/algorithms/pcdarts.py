"""PC-DARTS (Xu et al. 2020): DARTS with partial channels and edge normalisation, the alphas frozen at first."""
from __future__ import annotations

from .base import DARTS_DEFAULTS, register_algorithm
from .darts import Darts

WARMUP, EPOCHS = 15, 50  # PC-DARTS freezes the alphas for the first 15 of its 50 epochs


@register_algorithm
class PCDarts(Darts):
    """K=``pc_k`` (4): 1/K of each edge's channels go through the mixed op, the rest bypass it, then channel
    shuffle; edge normalisation (``beta_*``, a softmax per node over its incoming edges), the genotype ranked by
    softmax(alpha) * edge weight. The alphas are frozen for the first ``warmup`` epochs: PC-DARTS' 15 of 50; for
    other epoch counts the same fraction, floor(0.3 * epochs) (so 0 for 1-3 epochs)."""
    name = "pcdarts"
    defaults = dict(DARTS_DEFAULTS, batch_size=256, lr=0.1, lr_min=0.0, arch_lr=6e-4)  # PC-DARTS train_search.py

    @classmethod
    def resolve(cls, cfg):
        if cfg.warmup is None:
            cfg.warmup = min(WARMUP, WARMUP * cfg.epochs // EPOCHS)

    @classmethod
    def supernet_options(cls, cfg):
        return dict(k=cfg.pc_k, edge_norm=True)
