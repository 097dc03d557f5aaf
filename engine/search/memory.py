"""``--max-memory``: the largest batch size whose search step fits a memory budget, on any device.

The step profile (``ktnas.engine.profile.step``: the step run once on fake tensors, every tensor's bytes booked as
CUDA's allocator books them, seconds per profile whatever the batch) gives the step's peak at a few batch sizes,
and :func:`profile_batch_size` finds the largest batch within the budget from them (the peak is piecewise linear
in the batch: fixed bytes plus bytes per sample). On CUDA a trial step (a real one,
``torch.cuda.max_memory_allocated``) confirms it, and a binary search of trial steps below it takes over where the
device needs more than the profile sees (cuDNN workspaces, the CUDA context are not in it)."""
from __future__ import annotations

import dataclasses
import gc

import torch

from ktnas.cache.errors import KtnasError

from ktnas.engine import distributed
from ktnas.cache.flags import format_bytes
from ktnas.engine.search.run import SearchRun

REFINE = 6  # at most this many profiles after the bracket's


@dataclasses.dataclass
class ProfileChoice:
    """The profile's choice: ``batch`` (0: not even batch 1 fits), its profiled ``peak``, the last secant through
    the profiled points (``fixed + per_sample * batch`` bytes), the number of profiles run, and whether CUDA
    trial steps confirmed it."""
    batch: int
    peak: int
    fixed: int
    per_sample: float
    profiles: int
    confirmed: bool = False


def profile_peak(cfg, info: dict, batch: int) -> int:
    """The peak bytes of one search step of ``cfg`` at ``batch``, by the step profile on fake tensors (steady
    state: optimiser state and the previous step's gradients in place)."""
    from ktnas.engine.profile.step import profile_search_step

    return profile_search_step(cfg, info, batch)["peak_bytes"]


def profile_batch_size(cfg, info: dict, budget: int) -> ProfileChoice:
    """The largest batch in [1, cfg.batch_size] whose profiled peak is within ``budget`` bytes.

    The peak is the largest, over the step's moments, of a linear function of the batch (what is live then:
    weights, gradients and optimiser state fixed, activations per sample), so it is convex and piecewise linear
    in the batch: a secant through two profiled batches lies above it between them. The search brackets the
    budget (``cfg.batch_size``, then an eighth of it, then 1), then takes the secant's batch, which fits, as the
    new lower end (regula falsi from below) until the secant gives nothing more: exact once both ends lie on one
    linear piece, and at worst a few samples short after :data:`REFINE` profiles."""
    peaks = {}

    def peak(b):
        if b not in peaks:
            peaks[b] = profile_peak(cfg, info, b)
        return peaks[b]

    def choice(batch, lo, hi):  # batch 0 reports batch 1's peak
        per = (peak(hi) - peak(lo)) / (hi - lo) if hi > lo else 0.0
        return ProfileChoice(batch, peak(max(batch, 1)), int(peak(lo) - per * lo), per, len(peaks))

    hi = cfg.batch_size
    lo = max(1, hi // 8)
    if peak(hi) <= budget:
        return choice(hi, lo, hi)
    if peak(lo) > budget:
        lo, hi = 1, lo
        if peak(1) > budget:
            return choice(0, 1, hi)
    for _ in range(REFINE):  # invariant: peak(lo) <= budget < peak(hi)
        b = lo + int((budget - peak(lo)) * (hi - lo) // (peak(hi) - peak(lo)))
        if b <= lo:
            break
        lo, hi = (b, hi) if peak(b) <= budget else (lo, b)
        if hi - lo <= 1:
            break
    return choice(lo, lo, hi)


def trial_peak(cfg, device, info: dict, batch_size: int) -> int | None:
    """``torch.cuda.max_memory_allocated`` over one search step (a fresh network, the algorithm's architecture
    and weight steps on random inputs of the data's shape) at ``batch_size``; None when it runs out of memory."""
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run = SearchRun(dataclasses.replace(cfg, batch_size=batch_size, progress=False), device, info)
        batch = lambda: (torch.randn(batch_size, *info["shape"], device=device),
                         torch.randint(info["num_classes"], (batch_size,), device=device))
        run.train_epoch(run.arch_start, [batch()], [batch()])  # an epoch whose steps train the alphas too
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    except torch.cuda.OutOfMemoryError:
        return None


def _confirm_on_cuda(cfg, device, info: dict, start: int) -> int:
    """The largest batch in [1, start] whose trial step peaks within the budget (``start`` first: the profile's
    choice, then a binary search below it); 0 if none does."""
    peaks = {}

    def fits(b: int) -> bool:
        peaks[b] = trial_peak(cfg, device, info, b)
        gc.collect()
        torch.cuda.empty_cache()
        return peaks[b] is not None and peaks[b] <= cfg.max_memory

    if fits(start):
        return start
    lo, hi = 0, start  # invariant: lo fits (0 trivially), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def choose_batch_size(cfg, device, info: dict) -> ProfileChoice:
    """``--max-memory``: the largest batch size in [1, cfg.batch_size] that fits ``cfg.max_memory`` bytes by the
    step profile (:func:`profile_batch_size`), on CUDA confirmed by trial steps (``confirmed``); under torchrun
    the smallest choice of the ranks. KtnasError if not even batch size 1 fits."""
    pick = profile_batch_size(cfg, info, cfg.max_memory)
    profiled = pick.batch
    one = pick.peak if pick.batch == 0 else None  # the profiled peak of batch 1 when even that is too much
    pick.confirmed = pick.batch > 0 and device.type == "cuda"
    if pick.confirmed:
        pick.batch = _confirm_on_cuda(cfg, device, info, pick.batch)
    pick.batch = distributed.min_over_ranks(pick.batch, device)
    if pick.batch == 0:
        how = (f"needs {format_bytes(one)} by the step profile" if one is not None else
               f"runs out of it in trial steps on {device}" if pick.confirmed else "does not fit on another rank")
        raise KtnasError(f"--max-memory {format_bytes(cfg.max_memory)}: even batch size 1 {how}: allow more memory, "
                         f"or search a smaller network (--channels, --layers)")
    if pick.batch != profiled:  # the trials or another rank chose less: that batch's profiled peak
        pick.peak = profile_peak(cfg, info, pick.batch)
    return pick
