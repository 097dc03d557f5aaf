"""``--max-memory``: the largest batch size whose search step fits a memory budget (CUDA: trial steps)."""
from __future__ import annotations

import dataclasses
import gc

import torch

from ktnas.cache.errors import KtnasError

from . import distributed
from .flags import format_bytes
from .searcher import SearchRun


def trial_peak(cfg, device, info: dict, batch_size: int) -> int | None:
    """``torch.cuda.max_memory_allocated`` over one search step (a fresh network, the algorithm's architecture
    and weight steps on random inputs of the data's shape) at ``batch_size``; None when it runs out of memory."""
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run = SearchRun(dataclasses.replace(cfg, batch_size=batch_size, progress=False), device, info)
        batch = lambda: (torch.randn(batch_size, *info["shape"], device=device),
                         torch.randint(info["num_classes"], (batch_size,), device=device))
        run.train_epoch(cfg.warmup, [batch()], [batch()])  # at epoch `warmup` the alphas train (pcdarts too)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    except torch.cuda.OutOfMemoryError:
        return None


def choose_batch_size(cfg, device, info: dict) -> int:
    """The largest batch size in [1, cfg.batch_size] whose trial step (:func:`trial_peak`) peaks within
    ``cfg.max_memory`` bytes, by binary search (out of memory counts as too big); under torchrun the smallest
    choice of the ranks. KtnasError if not even batch size 1 fits."""
    peaks = {}

    def fits(b: int) -> bool:
        peaks[b] = trial_peak(cfg, device, info, b)
        gc.collect()
        torch.cuda.empty_cache()
        return peaks[b] is not None and peaks[b] <= cfg.max_memory

    lo, hi = 0, cfg.batch_size  # invariant: lo fits (0 trivially), hi does not (unless it is the request)
    if fits(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    lo = distributed.min_over_ranks(lo, device)
    if lo == 0:
        need = "runs out of memory" if peaks.get(1) is None else f"needs {format_bytes(peaks[1])}"
        raise KtnasError(f"--max-memory {format_bytes(cfg.max_memory)}: even batch size 1 {need}: allow more memory, "
                         f"or search a smaller network (--channels, --layers)")
    return lo
