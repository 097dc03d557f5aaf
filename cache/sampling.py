"""Which samples of a store split a :class:`~ktnas.cache.stream.FeatureLoader` yields, in which order, and
which view of each: the rules of :mod:`ktnas.cache.stream`'s docstring (steps 1-3 and "Views"), as plain
functions of numpy arrays, apart from the threads that move the bytes."""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import KtnasError


def select(indices, total: int, split: str, store_path: str) -> np.ndarray:
    """The selected sample indices in ascending order: all ``total`` of ``split`` or the validated ``indices``."""
    if indices is None:
        sel = np.arange(total, dtype=np.int64)
    else:
        arr = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise KtnasError(f"indices must be a 1-D sequence of integer sample indices (got dtype {arr.dtype}, "
                             f"shape {arr.shape}): pass integer indices into split '{split}'")
        sel = np.sort(arr.astype(np.int64))
        if sel.size and (sel[0] < 0 or sel[-1] >= total):
            bad = sel[0] if sel[0] < 0 else sel[-1]
            raise KtnasError(f"index {bad} is out of range for split '{split}' of {total} samples: pass "
                             f"indices in [0, {total})")
        dup = sel[1:][sel[1:] == sel[:-1]]
        if dup.size:
            raise KtnasError(f"indices repeat sample {dup[0]} ({dup.size} duplicates): pass each sample "
                             "index at most once")
    if sel.size == 0:
        raise KtnasError(f"no samples selected from split '{split}' of store {store_path}: pass a "
                         "non-empty split or indices")
    return sel


def fixed_view(view, views: int, split: str) -> int | None:
    """The one view every sample is read at, or None when each sample's view is drawn (``'random'``, V > 1)."""
    if isinstance(view, str):
        if view != "random":
            raise KtnasError(f"view must be 'random' or a view index, got {view!r}: pass one of those")
        return None if views > 1 else 0
    if isinstance(view, (int, np.integer)) and not isinstance(view, bool) and 0 <= view < views:
        return int(view)
    raise KtnasError(f"view {view!r} is out of range: split '{split}' has {views} view(s), pass an "
                     f"index in [0, {views}) or 'random'")


def chunk_pieces(sel: np.ndarray, chunk_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The store chunks holding the selected samples (ascending) and, for each, its selected samples."""
    chunks, starts, counts = np.unique(sel // chunk_size, return_index=True, return_counts=True)
    return chunks, [sel[s:s + c] for s, c in zip(starts, counts)]


def epoch_order(sel: np.ndarray, pieces: list[np.ndarray], chunk_size: int, *, epoch: int, seed: int,
                shuffle: bool, rank: int, world_size: int,
                chunks_per_group: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Rank ``rank``'s sample order for ``epoch`` and its shuffle groups (position ranges into the order)."""
    n = len(sel)
    if shuffle:
        perm = np.random.default_rng([seed, epoch, 0]).permutation(len(pieces))
        order = np.concatenate([pieces[p] for p in perm])
    else:
        order = sel
    L = math.ceil(n / world_size)
    order = order[np.arange(rank * L, (rank + 1) * L) % n]
    cid = order // chunk_size
    seg = np.concatenate([[0], np.flatnonzero(cid[1:] != cid[:-1]) + 1])
    bounds = [*seg[::chunks_per_group].tolist(), L]
    groups = list(zip(bounds[:-1], bounds[1:]))
    if shuffle:
        order = order.copy()
        rng = np.random.default_rng([seed, epoch, 1, rank])
        for s, e in groups:
            order[s:e] = order[s:e][rng.permutation(e - s)]
    return order, groups


def epoch_views(order: np.ndarray, *, epoch: int, seed: int, views: int, total: int) -> np.ndarray:
    """The drawn view of each sample of ``order``: one draw per sample of the whole split (``total``), so a
    sample's view depends on neither the rank split nor the mode."""
    draw = np.random.default_rng([seed, epoch, 2]).integers(0, views, size=total)
    return draw[order]
