"""Search algorithms, one module each behind :class:`~ktnas.engine.algorithms.base.Algorithm`, and a registry.

A new algorithm is one file with a subclass decorated by :func:`register_algorithm`, imported here.
"""
from __future__ import annotations

from ktnas.cache.errors import KtnasError

from ktnas.engine.algorithms import darts, darts_pt, gdas, pcdarts, random_ws  # noqa: F401  (each registers itself)
from ktnas.engine.algorithms.base import (ALGORITHMS, Algorithm, algorithm_variants, derive, one_hot_arch,
                                          register_algorithm, resolve_variant, variant_argv)
from ktnas.engine.algorithms.darts import unrolled_arch_grad
from ktnas.engine.algorithms.gdas import argmax_arch, gumbel_arch


def get_algorithm(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise KtnasError(f"unknown --algo {name!r}: use one of {', '.join(ALGORITHMS)}") from None


__all__ = ["ALGORITHMS", "Algorithm", "algorithm_variants", "register_algorithm", "resolve_variant", "variant_argv",
           "get_algorithm", "derive", "one_hot_arch",
           "unrolled_arch_grad", "gumbel_arch", "argmax_arch"]
