"""Search spaces: one module per space behind :class:`~ktnas.engine.spaces.base.SearchSpace`, and a registry.

A new space is one file: a :class:`SearchSpace` subclass and a :func:`register_space` call. The built-in ones are
imported here; any other is loaded by ``ktnas.engine.plugins`` (an installed package's entry point, or
``KTNAS_PLUGINS``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ktnas.cache.errors import KtnasError

from ktnas.engine.spaces import darts, nb201  # noqa: F401  (each registers its space)
from ktnas.engine.spaces.base import SPACES, SearchSpace, alpha_entropy, register_space
from ktnas.engine.spaces.darts import DARTS_OPS, DartsGenotype, derive_darts
from ktnas.engine.spaces.nb201 import NB201_OPS, NB201Genotype, derive_nb201


def get_space(name) -> SearchSpace:
    """The search space called ``name`` (or ``name`` itself when it is one)."""
    if isinstance(name, SearchSpace):
        return name
    try:
        return SPACES[name]
    except (KeyError, TypeError):
        raise KtnasError(f"unknown search space {name!r}; choose one of: {', '.join(SPACES)}") from None


def space_of(genotype) -> SearchSpace:
    """The space a genotype belongs to (its class's own space first: a space's genotype class may subclass
    another's)."""
    for space in SPACES.values():
        if type(genotype) is space.genotype:
            return space
    for space in SPACES.values():
        if isinstance(genotype, space.genotype):
            return space
    raise KtnasError(f"not a genotype of any search space: {type(genotype).__name__}")


def genotype_from_json(d: dict):
    """A genotype of the space its ``"space"`` key names."""
    if not isinstance(d, dict):
        raise KtnasError(f"a genotype must be a JSON object, got {type(d).__name__}")
    if d.get("space") not in SPACES:
        raise KtnasError(f"genotype's space {d.get('space')!r} is not one of: {', '.join(SPACES)}")
    return SPACES[d["space"]].genotype.from_json(d)


def load_genotype(path):
    """Read a genotype JSON file (as written by ``save``); a missing or malformed file is a one-line KtnasError."""
    path = Path(path)
    hint = "pass a genotype.json written by ktnas search"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise KtnasError(f"{path}: no such genotype file; {hint}") from None
    except json.JSONDecodeError as e:
        raise KtnasError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KtnasError(f"{path}: cannot read genotype ({type(e).__name__}: {str(e).splitlines()[0]}); {hint}") \
            from None
    try:
        return genotype_from_json(d)
    except KtnasError as e:
        raise KtnasError(f"{path}: {e}; {hint}") from None


def count_skips(genotype) -> int:
    """skip_connect edges: in the normal cell (DARTS; the collapse indicator), in all edges (NB201)."""
    return space_of(genotype).count_skips(genotype)


def distinct_genotypes(space, n: int, seed: int, *, tag: int = 11, draw=None) -> list:
    """``n`` distinct architectures of ``space``, drawn uniformly with a generator seeded by (``seed``, ``tag``)
    (``ktnas bench ranking``'s candidates and ``ktnas rank --sample``'s are the same for a seed); ``draw(make)``:
    how a draw is made of ``make()`` (a budget's ``draw``: again until it fits)."""
    rng, found = np.random.default_rng([seed, tag]), {}
    make = lambda: random_genotype(space, rng)  # noqa: E731
    for _ in range(100 * n):
        if len(found) == n:
            break
        g = draw(make) if draw else make()
        found.setdefault(genotype_str(g), g)
    if len(found) < n:
        raise KtnasError(f"the {get_space(space).name} space gave only {len(found)} distinct architectures: ask "
                         f"for {len(found)} or fewer")
    return list(found.values())


def genotype_str(genotype) -> str:
    """One line: NB201's architecture string, or DARTS' cells as ``normal=op~input,... reduce=...``."""
    return space_of(genotype).short(genotype)


def random_genotype(space, rng: np.random.Generator):
    """A uniformly sampled valid genotype of ``space`` (a name or a space)."""
    return get_space(space).random_genotype(rng)


__all__ = ["SPACES", "SearchSpace", "register_space", "get_space", "space_of", "genotype_from_json", "load_genotype",
           "count_skips", "genotype_str", "random_genotype", "alpha_entropy", "DARTS_OPS", "NB201_OPS",
           "DartsGenotype", "NB201Genotype", "derive_darts", "derive_nb201"]
