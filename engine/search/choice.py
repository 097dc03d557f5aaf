"""How far a search's architecture weights moved, and whether they support the genotype derived from them.

A derivation always returns a genotype, even from weights that never left their uniform start; at a small budget
(a few hundred steps of the papers' architecture learning rate) that is the normal case, and the genotype is then
as good as a random draw. Two figures per cell type say how much the weights chose: the entropy of softmax(alpha)
against its maximum ln K (1.0: uniform), and, per edge, the margin between the weight of the op the derivation
picks and the next op it could have picked. The choice counts as supported when the median margin of every cell
type is at least :data:`MIN_MARGIN` times the uniform weight 1/K.
"""
from __future__ import annotations

import math

import numpy as np

from ktnas.engine.spaces.base import alpha_entropy, as_array, softmax

MIN_MARGIN = 0.1  # the median margin, in units of the uniform weight 1/K, that supports a choice


def movement(space, alphas: dict) -> dict:
    """``{entropy, entropy_ratio, margins, margin_median}`` (each ``{cell type: ...}``) of architecture weights
    ``{cell type: [edges, ops]}``; margins per edge over the ops the space's derivation may pick."""
    k = len(space.ops)
    pickable = space.pickable()
    out = dict(entropy={}, entropy_ratio={}, margins={}, margin_median={})
    for t, a in alphas.items():
        a = as_array(a)
        w = np.sort(softmax(a)[:, pickable], axis=-1)
        margins = w[:, -1] - w[:, -2] if w.shape[1] > 1 else w[:, -1]
        out["entropy"][t] = alpha_entropy(a)
        out["entropy_ratio"][t] = out["entropy"][t] / math.log(k)
        out["margins"][t] = [float(m) for m in margins]
        out["margin_median"][t] = float(np.median(margins))
    return out


def supported(space, moved: dict) -> bool:
    """Whether every cell type's median margin is at least MIN_MARGIN of the uniform weight."""
    return all(m >= MIN_MARGIN / len(space.ops) for m in moved["margin_median"].values())


def describe(space, moved: dict) -> str:
    """One line: per cell type, the entropy against its maximum and the median margin."""
    return "; ".join(f"{t}: entropy {100 * moved['entropy_ratio'][t]:.1f}% of its maximum, median margin "
                     f"{moved['margin_median'][t]:.4f} (uniform weight {1 / len(space.ops):.3f})"
                     for t in moved["entropy"])


class UnsupportedChoice(UserWarning):
    """A search's genotype that its architecture weights do not support (the one line says how little they moved)."""


def unsupported_warning(space, moved: dict, steps: int) -> str:
    """The one-line warning of a genotype its architecture weights do not support."""
    return (f"the architecture weights barely moved in {steps} architecture steps ({describe(space, moved)}): the "
            f"genotype is close to a random draw; search for more steps (more epochs or samples) or raise "
            f"--arch-lr")


__all__ = ["MIN_MARGIN", "UnsupportedChoice", "movement", "supported", "describe", "unsupported_warning"]
