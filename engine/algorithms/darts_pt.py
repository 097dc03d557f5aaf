"""DARTS-PT (Wang et al., "Rethinking Architecture Selection in Differentiable NAS", ICLR 2021): the supernet
trained as DARTS' (first order), the genotype selected by perturbation instead of by the largest weight.

Edge by edge, in a seeded random order, each op the derivation may pick is removed (its weight set to 0) and the
supernet's validation accuracy measured; the op whose removal hurts the accuracy most is kept, and the edge is
discretised to it (one-hot) before the next edge is decided. Then, where the space chooses inputs (DARTS: 2 per
node), each input edge of a node is removed in turn and the ones whose removal hurts most are kept. The paper
fine-tunes the supernet for a few epochs after each decision; at the budgets this selection is meant for, that
tuning costs more than the whole search, and it is left out (``pt_batches`` bounds the cost of the measurements
instead). The selection does not need the architecture weights to have moved.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import field

import numpy as np
import torch
import torch.nn.functional as F

from ktnas.engine.algorithms.base import derive, register_algorithm
from ktnas.engine.algorithms.darts import Darts, DartsOptions


@dataclasses.dataclass
class DartsPTOptions(DartsOptions):
    """DARTS' options, and how much validation data each perturbation is measured on."""
    pt_batches: int = field(default=8, metadata=dict(min=0, help=(
        "validation batches each perturbation is measured on (0: the whole search-validation split)")))


def _removed(weights: dict, t: str, where) -> dict:
    """``weights`` with ``weights[t][where]`` set to 0 (an op of an edge, or a whole edge): a copy of that cell
    type's matrix, the others shared."""
    w = dict(weights)
    w[t] = weights[t].clone()
    w[t][where] = 0
    return w


@register_algorithm
class DartsPT(Darts):
    name = "darts-pt"
    Options = DartsPTOptions
    variants = None

    def genotype(self, epoch, val, files):
        if epoch < self.cfg.epochs - 1:
            return super().genotype(epoch, val, files)
        from ktnas.engine.search.choice import movement  # at run time: ktnas.engine.search imports the algorithms

        batches = list(itertools.islice(val, self.opts.pt_batches or None))
        trained = movement(self.model.space, {t: a.detach().cpu().numpy() for t, a in self.model.alphas().items()})
        scores = self.select(batches, np.random.default_rng([self.cfg.seed, 3]))
        with torch.no_grad():  # the selection as the final alphas: derive gives it back
            for t, a in scores.items():
                self.model.alphas()[t].copy_(torch.from_numpy(a))
        # how far the supernet's own weights moved, before the selection replaced them
        return derive(self.model), {"selection": "perturbation", "pt_batches": len(batches),
                                    "trained_entropy_ratio": trained["entropy_ratio"]}

    def _accuracy(self, batches, weights: dict) -> float:
        return self.run.evaluate(batches, lambda: {t: (w, None) for t, w in weights.items()})["val_acc"]

    def select(self, batches, rng) -> dict:
        """``{cell type: [edges, ops]}`` logits whose derivation is the perturbation's choice: the chosen op of each
        edge at 5 plus a small bonus that ranks the edges of a node by how much removing them hurts."""
        space = self.model.space
        weights = {t: F.softmax(a.detach(), dim=-1).clone() for t, a in self.model.alphas().items()}
        pickable = space.pickable()
        chosen = {t: np.zeros(len(w), dtype=int) for t, w in weights.items()}
        order = [(t, e) for t in weights for e in range(len(weights[t]))]
        for i in rng.permutation(len(order)):
            t, e = order[i]
            drops = {j: -self._accuracy(batches, _removed(weights, t, (e, j))) for j in pickable}
            chosen[t][e] = max(drops, key=lambda j: (drops[j], -j))
            weights[t][e] = F.one_hot(torch.tensor(chosen[t][e]), len(space.ops)).to(weights[t].dtype)
        edge_drop = {t: np.zeros(len(w)) for t, w in weights.items()}
        if space.chooses_inputs:
            base = self._accuracy(batches, weights)
            for t in weights:
                for e in range(len(weights[t])):
                    edge_drop[t][e] = base - self._accuracy(batches, _removed(weights, t, e))
        out = {}
        for t, w in weights.items():
            a = np.zeros(tuple(w.shape))
            ranks = np.argsort(np.argsort(edge_drop[t], kind="stable"), kind="stable")  # 0 = least hurt
            a[np.arange(len(a)), chosen[t]] = 5.0 + ranks / (10.0 * len(a))
            out[t] = a
        return out
