"""The fused mixed op's launch bookkeeping: the tile widths and warps of each kernel (:data:`LAUNCH_CONFIG`),
the buffers the passes allocate, and every launch, reported to observers (:func:`count_launches`,
:func:`observe_launches`) before it runs -- on fake tensors the same launches are reported and none runs.
:data:`KERNELS`: every kernel by name (``triton_fwd.py``, ``triton_bwd.py``; empty without triton)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import triton_bwd, triton_fwd
from .errors import KernelError

KERNELS = {**triton_fwd.KERNELS, **triton_bwd.KERNELS}  # name -> @triton.jit function (tests may replace them)
_POISON = False  # tests set True: every buffer the kernels must fill starts as NaN


def empty(shape, dtype, device) -> torch.Tensor:
    """A buffer the kernels fill (NaN-filled when ``_POISON``, so an element left unwritten shows)."""
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_MAX_BLOCK = 1024  # positions per program, at most, in every kernel (tests lower it to get several tiles)
# per kernel: (positions per program at most, warps). Chosen so that every kernel compiles without register
# spills for sm_80 and sm_90 in every dtype: ``ktnas bench kernels --aot`` (kernels/aot.py) shows registers and
# spills. At 1024 / 4 warps the gradient pass needed 255 registers and spilled 716-872 B on sm_90 (256 / 4: 96
# registers), the reduce pass 168 registers and 4 B in fp32 (1024 / 8: 89). The finalize kernels run one program
# per channel: their first number caps the tiles summed at once (tiles).
LAUNCH_CONFIG = {"_fwd_stats_kernel": (1024, 4), "_fwd_finalize_kernel": (1024, 4), "_fwd_out_kernel": (1024, 4),
                 "_pc_bypass_fwd_kernel": (1024, 4), "_bwd_reduce_kernel": (1024, 8),
                 "_bwd_finalize_kernel": (1024, 4), "_bwd_grad_kernel": (256, 4), "_pc_bypass_bwd_kernel": (1024, 4)}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block(m: int, kernel: str) -> int:
    """Positions per program of ``kernel`` for ``m`` positions per channel."""
    return max(16, min(_MAX_BLOCK, LAUNCH_CONFIG[kernel][0], _next_pow2(m)))


def tiles(t: int, kernel: str) -> int:
    """Tiles a finalize program (``kernel``) sums at once."""
    return max(16, min(LAUNCH_CONFIG[kernel][0], _next_pow2(t)))


@dataclass(frozen=True)
class Launch:
    """One kernel launch of the fused op (on fake tensors: one it would issue).

    ``nbytes``: bytes of the activation-sized tensors the kernel reads and writes (x, the conv outputs, out, the
    output gradient, dx, the conv gradients), each counted once per launch that touches it (window re-reads are
    served by the cache); the per-channel statistics, tile partials and weights (O(C) bytes) are left out.
    ``args``: the positional arguments, a ``torch.dtype`` for each tensor and the value of each number.
    ``constexprs``: the compile-time arguments, sorted (name, value) pairs."""

    kernel: str
    grid: tuple
    nbytes: int
    args: tuple
    constexprs: tuple
    num_warps: int


class LaunchCounts(dict):
    """``{kernel name: {"launches": n, "bytes": b}}`` of the launches seen; ``launches`` and ``bytes``: totals."""

    def add(self, launch: Launch) -> None:
        c = self.setdefault(launch.kernel, {"launches": 0, "bytes": 0})
        c["launches"] += 1
        c["bytes"] += launch.nbytes

    @property
    def launches(self) -> int:
        return sum(c["launches"] for c in self.values())

    @property
    def bytes(self) -> int:
        return sum(c["bytes"] for c in self.values())


_OBSERVERS: list = []  # callables taking each Launch (count_launches, observe_launches)


@contextlib.contextmanager
def observe_launches(fn):
    """Call ``fn(launch)`` with a :class:`Launch` for every kernel launch the fused op issues inside the block --
    and, on fake tensors, for every launch it would issue (the same ones: the same code decides them). Launches
    decided while torch.compile traces the op are not seen; the compiled code's own runs are."""
    _OBSERVERS.append(fn)
    try:
        yield fn
    finally:
        _OBSERVERS.remove(fn)


@contextlib.contextmanager
def count_launches():
    """Count the fused op's kernel launches inside the block, on real or fake tensors::

        with count_launches() as counts:
            step()
        counts.launches, counts.bytes            # totals
        counts["_bwd_grad_kernel"]["launches"]   # per kernel: {"launches": n, "bytes": b}
    """
    counts = LaunchCounts()
    with observe_launches(counts.add):
        yield counts


# CUDA's grid limits per axis: the tiled kernels put their tiles on axis 0 and their channels on axis 1
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def launch(kernel: str, grid, args, nbytes, run: bool, **constexprs) -> None:
    """Launch ``kernel`` (when ``run``; the fake implementations only report it) with its num_warps from
    :data:`LAUNCH_CONFIG`, and report it to the observers. A grid over CUDA's limits is refused (KernelError)."""
    if any(g > lim for g, lim in zip(grid, GRID_LIMITS)):
        raise KernelError(f"{kernel}: grid {tuple(grid)} exceeds CUDA's limits {GRID_LIMITS[:len(grid)]}: use "
                          f"--kernels torch")
    num_warps = LAUNCH_CONFIG[kernel][1]
    if _OBSERVERS and (run or torch._guards.TracingContext.try_get() is None):
        rec = Launch(kernel, tuple(int(g) for g in grid), int(nbytes),
                     tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args),
                     tuple(sorted(constexprs.items())), num_warps)
        for fn in tuple(_OBSERVERS):
            fn(rec)
    if run:
        KERNELS[kernel][tuple(grid)](*args, num_warps=num_warps, **constexprs)
