"""Fused Triton kernels for the 'full' mixed operation (DARTS / NAS-Bench-201), forward and backward.

Same semantics as :func:`ktnas.kernels.reference.mixed_op_reference` (the specification): ``out = sum_k w_k op_k(x)``
with the parameter-free ops (none, skip_connect at stride 1, 3x3 avg pool with count_include_pad=False, 3x3 max
pool; padding 1; stride 1 or 2) computed inside the kernels from ``x``, the affine-free batch norm (batch
statistics, biased variance) after pools when ``pool_bn`` and after every conv branch (pre-BN output given in
``conv_outs``), and the weighted sum. Inputs float32, bfloat16 or float16; arithmetic in float32; the output in
the dtype of ``x``.

Passes (the elementwise kernels run one program per (channel, tile of BLOCK flat positions); the conv outputs are
passed as separate pointers, never stacked into a copy):

forward
  1. ``_fwd_stats_kernel``: per (channel, tile) partial sums and sums of squares (shifted by the channel's first
     value, for a stable variance) of the pooled values (when pool_bn) and of every conv output, into an fp32
     buffer [C, T, 2*(2+K)]; ``_fwd_finalize_kernel`` (one program per channel) sums the tiles into the
     per-channel mean / rstd [2+K, C]. Both are skipped when no op has a BN.
  2. ``_fwd_out_kernel``: recomputes the pools, normalises, weights and sums; writes only ``out`` (PC-DARTS: at
     the channel-shuffled places, ``_pc_bypass_fwd_kernel`` writing the bypassed channels).
  Saved for backward: x, the conv outputs, the weights, mean/rstd (per channel).
backward
  1. ``_bwd_reduce_kernel``: per (channel, tile) partial sums of g, g*x (skip) and g*yhat for every branch
     (yhat: the branch's normalised output, recomputed); ``_bwd_finalize_kernel`` turns them into the BN-backward
     means and each channel's share of dweights.
  2. ``_bwd_grad_kernel``: one elementwise pass computing, per tile, dx at input positions (identity, plus a
     gather over the <= 9 output windows that contain the position: avg pool's share, and max pool's gradient
     where the recomputed argmax -- the first maximum in row-major order, as PyTorch -- is this position) and
     d conv_out_k = w_k rstd_k (g - mean(g) - yhat_k mean(g yhat_k)) at output positions
     (``_pc_bypass_bwd_kernel``: dx of PC-DARTS' bypassed channels).

Per edge and step that is 2-4 kernel launches forward and 3-4 backward, plus a few tiny torch ops (the weight
slots, the dweights sum). Tile widths and warps per kernel: :data:`LAUNCH_CONFIG` (no kernel spills registers on
sm_80 / sm_90: ``ktnas bench kernels --aot``). Not tuned on a GPU yet (the max-pool gather recomputes 9 windows
per input element).

The op is registered with ``torch.library`` (``torch.ops.ktnas.mixed_op`` and ``mixed_op_backward``, with fake
implementations, an autograd formula and FLOP formulas), so it runs under ``FakeTensorMode`` (nothing launched)
and ``torch.compile(fullgraph=True)``. :func:`count_launches` counts the kernel launches it issues -- on fake
tensors, those it would issue -- with the bytes each moves (:class:`Launch`); :func:`fused_bytes` sums them for
one edge.

Import this module only after setting ``TRITON_INTERPRET=1`` if you want the interpreter (CPU tensors).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .reference import _check, _out_shape, is_conv_branch

try:  # the module imports without triton; available() then says False
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_POISON = False  # tests set True: every buffer the kernels must fill starts as NaN


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run: triton importable, and a CUDA device (``device``, or any CUDA device
    when None) or the interpreter (TRITON_INTERPRET=1, set before triton was imported)."""
    if triton is None:
        return False
    if _interpret():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _empty(shape, dtype, device):
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_MAX_BLOCK = 1024  # positions per program, at most, in every kernel (tests lower it to get several tiles)
# per kernel: (positions per program at most, warps). Chosen so that every kernel compiles without register
# spills for sm_80 and sm_90 in every dtype: ``ktnas bench kernels --aot`` (kernels/aot.py) shows registers and
# spills. At 1024 / 4 warps the gradient pass needed 255 registers and spilled 716-872 B on sm_90 (256 / 4: 96
# registers), the reduce pass 168 registers and 4 B in fp32 (1024 / 8: 89). The finalize kernels run one program
# per channel: their first number caps the tiles summed at once (_tiles).
LAUNCH_CONFIG = {"_fwd_stats_kernel": (1024, 4), "_fwd_finalize_kernel": (1024, 4), "_fwd_out_kernel": (1024, 4),
                 "_pc_bypass_fwd_kernel": (1024, 4), "_bwd_reduce_kernel": (1024, 8),
                 "_bwd_finalize_kernel": (1024, 4), "_bwd_grad_kernel": (256, 4), "_pc_bypass_bwd_kernel": (1024, 4)}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block(m: int, kernel: str) -> int:
    """Positions per program of ``kernel`` for ``m`` positions per channel."""
    return max(16, min(_MAX_BLOCK, LAUNCH_CONFIG[kernel][0], _next_pow2(m)))


def _tiles(t: int, kernel: str) -> int:
    """Tiles a finalize program (``kernel``) sums at once."""
    return max(16, min(LAUNCH_CONFIG[kernel][0], _next_pow2(t)))


if triton is not None:

    @triton.jit
    def _window(x_ptr, plane, oh, ow, H, W, STRIDE: tl.constexpr, mask):
        """3x3 window (padding 1) at output (oh, ow) of the plane starting at ``plane``: (avg, max, argmax)
        with avg over the valid positions only and argmax the first maximum in row-major order (kh*3+kw)."""
        s = tl.zeros(oh.shape, dtype=tl.float32)
        cnt = tl.zeros(oh.shape, dtype=tl.float32)
        mx = tl.full(oh.shape, float("-inf"), dtype=tl.float32)
        idx = tl.zeros(oh.shape, dtype=tl.int32)
        for kh in tl.static_range(3):
            ih = oh * STRIDE - 1 + kh
            okh = (ih >= 0) & (ih < H)
            for kw in tl.static_range(3):
                iw = ow * STRIDE - 1 + kw
                ok = mask & okh & (iw >= 0) & (iw < W)
                v = tl.load(x_ptr + plane + ih * W + iw, mask=ok, other=0.0).to(tl.float32)
                s += v
                cnt += ok.to(tl.float32)
                better = ok & (v > mx)
                mx = tl.where(better, v, mx)
                idx = tl.where(better, kh * 3 + kw, idx)
        avg = s / tl.maximum(cnt, 1.0)
        mx = tl.where(mask, mx, 0.0)
        return avg, mx, idx

    @triton.jit
    def _positions(t, MM, HH, WW, BLOCK: tl.constexpr):
        """Tile ``t`` of one channel's N*HH*WW positions: (mask, n, h, w)."""
        offs = t * BLOCK + tl.arange(0, BLOCK)
        n = (offs // (HH * WW)).to(tl.int64)
        r = offs % (HH * WW)
        return offs < MM, n, r // WW, r % WW

    @triton.jit
    def _out_positions(t, M, C, c, Ho, Wo, BLOCK: tl.constexpr):
        """Tile ``t`` of channel ``c``'s N*Ho*Wo output positions: (mask, n, oh, ow, flat NCHW offset)."""
        mask, n, oh, ow = _positions(t, M, Ho, Wo, BLOCK)
        return mask, n, oh, ow, _out_offset(n, oh, ow, Ho, Wo, C, c)

    @triton.jit
    def _out_offset(n, oh, ow, Ho, Wo, OC, oc):
        """Flat offset of (n, channel oc, oh, ow) in an [N, OC, Ho, Wo] output (or its gradient)."""
        return (n * OC + oc) * Ho * Wo + oh * Wo + ow

    @triton.jit
    def _hat(v, mean_ptr, rstd_ptr, s, C, c):
        """Affine-free batch norm of stream ``s`` (0 avg pool, 1 max pool, 2+k conv k) of channel ``c``."""
        return (v - tl.load(mean_ptr + s * C + c)) * tl.load(rstd_ptr + s * C + c)

    @triton.jit
    def _pools_hat(x_ptr, plane, oh, ow, H, W, STRIDE: tl.constexpr, mask, mean_ptr, rstd_ptr, C, c,
                   POOL_BN: tl.constexpr):
        """The two pools of the window at (oh, ow), batch-normalised with the saved statistics when POOL_BN."""
        avg, mx, _ = _window(x_ptr, plane, oh, ow, H, W, STRIDE, mask)
        if POOL_BN:
            avg = _hat(avg, mean_ptr, rstd_ptr, 0, C, c)
            mx = _hat(mx, mean_ptr, rstd_ptr, 1, C, c)
        return avg, mx

    @triton.jit
    def _cp(k: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
        """The k-th of eight pointers (the conv branches' tensors, passed one by one: no stacked copy)."""
        if k == 0:
            p = p0
        elif k == 1:
            p = p1
        elif k == 2:
            p = p2
        elif k == 3:
            p = p3
        elif k == 4:
            p = p4
        elif k == 5:
            p = p5
        elif k == 6:
            p = p6
        else:
            p = p7
        return p

    @triton.jit
    def _shift(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, s: tl.constexpr, c, H, W, Ho, Wo):
        """The value stream ``s`` of channel ``c`` is shifted by before its sums of squares (a stable variance):
        the channel's first input value for the pools, the first value of conv output k for s = 2 + k."""
        if s < 2:
            v = tl.load(x_ptr + c * H * W).to(tl.float32)
        else:
            v = tl.load(_cp(s - 2, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7) + c * Ho * Wo).to(tl.float32)
        return v

    @triton.jit
    def _moments(base, s: tl.constexpr, d, mask):
        """Store the sum and the sum of squares of ``d`` where ``mask`` as stream ``s``'s two partials (a stream
        without statistics passes zeros)."""
        d = tl.where(mask, d, 0.0)
        tl.store(base + 2 * s, tl.sum(d, axis=0))
        tl.store(base + 2 * s + 1, tl.sum(d * d, axis=0))

    @triton.jit
    def _fwd_stats_kernel(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, part_ptr, C, XC, H, W, Ho, Wo, M, T,
                          HAS_AVG: tl.constexpr, HAS_MAX: tl.constexpr, POOL_BN: tl.constexpr,
                          K: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        # partials [C, T, 2*(2+K)]: per stream (avg, max, conv_0..K-1) the sum and the sum of squares of
        # (value - shift); zeros for streams without statistics
        c = tl.program_id(0)
        t = tl.program_id(1)
        mask, n, oh, ow, oplane = _out_positions(t, M, C, c, Ho, Wo, BLOCK)
        Q: tl.constexpr = 2 * (2 + K)
        base = part_ptr + (c * T + t) * Q
        if POOL_BN and (HAS_AVG or HAS_MAX):
            avg, mx, _ = _window(x_ptr, (n * XC + c) * H * W, oh, ow, H, W, STRIDE, mask)
        if POOL_BN and HAS_AVG:
            _moments(base, 0, avg - _shift(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, 0, c, H, W, Ho, Wo), mask)
        else:
            _moments(base, 0, tl.zeros((BLOCK,), dtype=tl.float32), mask)
        if POOL_BN and HAS_MAX:
            _moments(base, 1, mx - _shift(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, 1, c, H, W, Ho, Wo), mask)
        else:
            _moments(base, 1, tl.zeros((BLOCK,), dtype=tl.float32), mask)
        for k in tl.static_range(K):
            y = tl.load(_cp(k, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7) + oplane, mask=mask, other=0.0).to(tl.float32)
            _moments(base, 2 + k, y - _shift(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, 2 + k, c, H, W, Ho, Wo),
                     mask)

    @triton.jit
    def _tile_sum(part_ptr, c, T, Q: tl.constexpr, q, BT: tl.constexpr):
        """Sum over the T tiles of channel ``c`` of partial ``q`` in a [C, T, Q] buffer."""
        acc = tl.zeros((BT,), dtype=tl.float32)
        for t0 in range(0, T, BT):
            offs = t0 + tl.arange(0, BT)
            acc += tl.load(part_ptr + (c * T + offs) * Q + q, mask=offs < T, other=0.0)
        return tl.sum(acc, axis=0)

    @triton.jit
    def _fwd_finalize_kernel(part_ptr, x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, mean_ptr, rstd_ptr, C, H, W,
                             Ho, Wo, M, T, eps,
                             HAS_AVG: tl.constexpr, HAS_MAX: tl.constexpr, POOL_BN: tl.constexpr,
                             K: tl.constexpr, BT: tl.constexpr):
        # per channel: mean and 1/sqrt(var + eps) of every stream [2+K, C] (0 and 1 for streams without BN)
        c = tl.program_id(0)
        Q: tl.constexpr = 2 * (2 + K)
        for s in tl.static_range(2 + K):
            if s >= 2 or (POOL_BN and ((s == 0 and HAS_AVG) or (s == 1 and HAS_MAX))):
                m1 = _tile_sum(part_ptr, c, T, Q, 2 * s, BT) / M
                var = tl.maximum(_tile_sum(part_ptr, c, T, Q, 2 * s + 1, BT) / M - m1 * m1, 0.0)
                shift = _shift(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, s, c, H, W, Ho, Wo)
                tl.store(mean_ptr + s * C + c, shift + m1)
                tl.store(rstd_ptr + s * C + c, 1.0 / tl.sqrt(var + eps))
            else:
                tl.store(mean_ptr + s * C + c, 0.0)
                tl.store(rstd_ptr + s * C + c, 1.0)

    @triton.jit
    def _fwd_out_kernel(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, w_ptr, mean_ptr, rstd_ptr, out_ptr, C, XC, OC,
                        OMUL, H, W, Ho, Wo, M,
                        HAS_SKIP: tl.constexpr, HAS_AVG: tl.constexpr, HAS_MAX: tl.constexpr,
                        POOL_BN: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        c = tl.program_id(0)
        t = tl.program_id(1)
        mask, n, oh, ow, oplane = _out_positions(t, M, C, c, Ho, Wo, BLOCK)
        xplane = (n * XC + c) * H * W
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        if HAS_SKIP:  # stride 1: output and input positions coincide
            acc += tl.load(w_ptr + 0) * tl.load(x_ptr + xplane + oh * W + ow, mask=mask, other=0.0).to(tl.float32)
        if HAS_AVG or HAS_MAX:
            avg, mx = _pools_hat(x_ptr, xplane, oh, ow, H, W, STRIDE, mask, mean_ptr, rstd_ptr, C, c, POOL_BN)
            if HAS_AVG:
                acc += tl.load(w_ptr + 1) * avg
            if HAS_MAX:
                acc += tl.load(w_ptr + 2) * mx
        for k in tl.static_range(K):
            y = tl.load(_cp(k, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7) + oplane, mask=mask, other=0.0).to(tl.float32)
            y = _hat(y, mean_ptr, rstd_ptr, 2 + k, C, c)
            acc += tl.load(w_ptr + 3 + k) * y
        tl.store(out_ptr + _out_offset(n, oh, ow, Ho, Wo, OC, c * OMUL), acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_reduce_kernel(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, g_ptr, mean_ptr, rstd_ptr, part_ptr, C, XC,
                           OC, OMUL, H, W, Ho, Wo, M, T,
                           HAS_SKIP: tl.constexpr, HAS_AVG: tl.constexpr, HAS_MAX: tl.constexpr,
                           POOL_BN: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        # partials [C, T, 4+K]: sum g, sum g*x (skip), sum g*yhat_avg, sum g*yhat_max, sum g*yhat_conv_k
        c = tl.program_id(0)
        t = tl.program_id(1)
        mask, n, oh, ow, oplane = _out_positions(t, M, C, c, Ho, Wo, BLOCK)
        Q: tl.constexpr = 4 + K
        base = part_ptr + (c * T + t) * Q
        xplane = (n * XC + c) * H * W
        g = tl.load(g_ptr + _out_offset(n, oh, ow, Ho, Wo, OC, c * OMUL), mask=mask, other=0.0).to(tl.float32)
        tl.store(base + 0, tl.sum(g, axis=0))
        if HAS_SKIP:
            xv = tl.load(x_ptr + xplane + oh * W + ow, mask=mask, other=0.0).to(tl.float32)
            tl.store(base + 1, tl.sum(g * xv, axis=0))
        else:
            tl.store(base + 1, 0.0)
        if HAS_AVG or HAS_MAX:
            avg, mx = _pools_hat(x_ptr, xplane, oh, ow, H, W, STRIDE, mask, mean_ptr, rstd_ptr, C, c, POOL_BN)
        if HAS_AVG:
            tl.store(base + 2, tl.sum(g * avg, axis=0))
        else:
            tl.store(base + 2, 0.0)
        if HAS_MAX:
            tl.store(base + 3, tl.sum(g * mx, axis=0))
        else:
            tl.store(base + 3, 0.0)
        for k in tl.static_range(K):
            y = tl.load(_cp(k, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7) + oplane, mask=mask, other=0.0).to(tl.float32)
            y = _hat(y, mean_ptr, rstd_ptr, 2 + k, C, c)
            tl.store(base + 4 + k, tl.sum(g * y, axis=0))

    @triton.jit
    def _bwd_finalize_kernel(part_ptr, mg_ptr, mgy_ptr, dwc_ptr, C, M, T, K: tl.constexpr, BT: tl.constexpr):
        # per channel: mg = mean of g, mgy[s] = mean of g * yhat_s (the BN-backward means), and the channel's
        # share of the op-weight gradients dwc[c] = [skip, avg, max, conv_0..K-1, none (0)]
        c = tl.program_id(0)
        Q: tl.constexpr = 4 + K
        tl.store(mg_ptr + c, _tile_sum(part_ptr, c, T, Q, 0, BT) / M)
        for q in tl.static_range(1, Q):
            total = _tile_sum(part_ptr, c, T, Q, q, BT)
            tl.store(dwc_ptr + c * Q + q - 1, total)
            if q >= 2:
                tl.store(mgy_ptr + (q - 2) * C + c, total / M)
        tl.store(dwc_ptr + c * Q + Q - 1, 0.0)

    @triton.jit
    def _bwd_grad_kernel(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, g_ptr, w_ptr, mean_ptr, rstd_ptr, mg_ptr,
                         mgy_ptr, dx_ptr, dc0, dc1, dc2, dc3, dc4, dc5, dc6, dc7,
                         C, XC, OC, OMUL, H, W, Ho, Wo, M, MI,
                         HAS_SKIP: tl.constexpr, HAS_AVG: tl.constexpr, HAS_MAX: tl.constexpr,
                         POOL_BN: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        # mg[c] = mean over (N, Ho, Wo) of g; mgy[s, c] = mean of g * yhat_s (s: avg, max, conv_0..K-1)
        c = tl.program_id(0)
        t = tl.program_id(1)
        mg = tl.load(mg_ptr + c)
        # -- d conv_out_k at output positions
        if K > 0:
            mask, n, oh, ow, oplane = _out_positions(t, M, C, c, Ho, Wo, BLOCK)
            g = tl.load(g_ptr + _out_offset(n, oh, ow, Ho, Wo, OC, c * OMUL), mask=mask, other=0.0).to(tl.float32)
            for k in tl.static_range(K):
                mean = tl.load(mean_ptr + (2 + k) * C + c)
                rstd = tl.load(rstd_ptr + (2 + k) * C + c)
                cp = _cp(k, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7)
                y = tl.load(cp + oplane, mask=mask, other=0.0).to(tl.float32)
                yh = (y - mean) * rstd
                d = tl.load(w_ptr + 3 + k) * rstd * (g - mg - yh * tl.load(mgy_ptr + (2 + k) * C + c))
                dp = _cp(k, dc0, dc1, dc2, dc3, dc4, dc5, dc6, dc7)
                tl.store(dp + oplane, d.to(dp.dtype.element_ty), mask=mask)
        # -- dx at input positions
        maski, ni, ih, iw = _positions(t, MI, H, W, BLOCK)
        plane = (ni * XC + c) * H * W
        gplane = (ni * OC + c * OMUL) * Ho * Wo
        dx = tl.zeros((BLOCK,), dtype=tl.float32)
        if HAS_SKIP:  # stride 1: Ho == H, Wo == W
            dx += tl.load(w_ptr + 0) * tl.load(g_ptr + gplane + ih * W + iw, mask=maski, other=0.0).to(tl.float32)
        if HAS_AVG or HAS_MAX:
            w_a = tl.load(w_ptr + 1)
            w_m = tl.load(w_ptr + 2)
            mean_a = tl.load(mean_ptr + 0 * C + c)
            rstd_a = tl.load(rstd_ptr + 0 * C + c)
            mgy_a = tl.load(mgy_ptr + 0 * C + c)
            mean_m = tl.load(mean_ptr + 1 * C + c)
            rstd_m = tl.load(rstd_ptr + 1 * C + c)
            mgy_m = tl.load(mgy_ptr + 1 * C + c)
            # output (oh, ow) covers input (ih, iw) at window offset (kh, kw) when ih = oh*STRIDE - 1 + kh
            for kh in tl.static_range(3):
                nh = ih + 1 - kh
                oh = tl.maximum(nh, 0) // STRIDE
                okh = (nh >= 0) & (oh < Ho) & ((tl.maximum(nh, 0) % STRIDE) == 0)
                for kw in tl.static_range(3):
                    nw = iw + 1 - kw
                    ow = tl.maximum(nw, 0) // STRIDE
                    ok = maski & okh & (nw >= 0) & (ow < Wo) & ((tl.maximum(nw, 0) % STRIDE) == 0)
                    go = tl.load(g_ptr + gplane + oh * Wo + ow, mask=ok, other=0.0).to(tl.float32)
                    avg, mx, idx = _window(x_ptr, plane, oh, ow, H, W, STRIDE, ok)
                    if HAS_AVG:
                        if POOL_BN:
                            yh = (avg - mean_a) * rstd_a
                            da = w_a * rstd_a * (go - mg - yh * mgy_a)
                        else:
                            da = w_a * go
                        # count of valid window positions (count_include_pad=False)
                        h0 = tl.maximum(oh * STRIDE - 1, 0)
                        h1 = tl.minimum(oh * STRIDE + 1, H - 1)
                        w0 = tl.maximum(ow * STRIDE - 1, 0)
                        w1 = tl.minimum(ow * STRIDE + 1, W - 1)
                        cnt = ((h1 - h0 + 1) * (w1 - w0 + 1)).to(tl.float32)
                        dx += tl.where(ok, da / tl.maximum(cnt, 1.0), 0.0)
                    if HAS_MAX:
                        if POOL_BN:
                            yh = (mx - mean_m) * rstd_m
                            dm = w_m * rstd_m * (go - mg - yh * mgy_m)
                        else:
                            dm = w_m * go
                        dx += tl.where(ok & (idx == kh * 3 + kw), dm, 0.0)
        tl.store(dx_ptr + plane + ih * W + iw, dx.to(dx_ptr.dtype.element_ty), mask=maski)

    @triton.jit
    def _pc_pool2(x_ptr, xplane, oh, ow, H, W, mask):
        """2x2 max pool, stride 2, ceil mode, at output (oh, ow): (max, argmax a*2+b, the first maximum)."""
        best = tl.full(oh.shape, float("-inf"), dtype=tl.float32)
        idx = tl.zeros(oh.shape, dtype=tl.int32)
        for a in tl.static_range(2):
            for b in tl.static_range(2):
                ih = oh * 2 + a
                iw = ow * 2 + b
                ok = mask & (ih < H) & (iw < W)
                v = tl.load(x_ptr + xplane + ih * W + iw, mask=ok, other=float("-inf")).to(tl.float32)
                better = ok & (v > best)
                best = tl.where(better, v, best)
                idx = tl.where(better, a * 2 + b, idx)
        return best, idx

    @triton.jit
    def _pc_bypass_fwd_kernel(x_ptr, out_ptr, c0, XC, KG, H, W, Ho, Wo, M, STRIDE: tl.constexpr,
                              BLOCK: tl.constexpr):
        # channel j >= c0 of x bypasses the mixed op (identity, or 2x2 max pool at stride 2) and lands at its
        # channel-shuffled place: concat channel j = g*c0 + i goes to output channel i*KG + g
        j = c0 + tl.program_id(0)
        mask, n, oh, ow = _positions(tl.program_id(1), M, Ho, Wo, BLOCK)
        xplane = (n * XC + j) * H * W
        if STRIDE == 1:
            v = tl.load(x_ptr + xplane + oh * W + ow, mask=mask, other=0.0)
        else:
            v, _ = _pc_pool2(x_ptr, xplane, oh, ow, H, W, mask)
        oc = (j % c0) * KG + j // c0
        tl.store(out_ptr + _out_offset(n, oh, ow, Ho, Wo, XC, oc), v.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pc_bypass_bwd_kernel(x_ptr, g_ptr, dx_ptr, c0, XC, KG, H, W, Ho, Wo, MI, STRIDE: tl.constexpr,
                              BLOCK: tl.constexpr):
        # dx of a bypass channel: the gradient of its shuffled output (stride 1), or, at stride 2, that of the
        # window holding the position when the position is the window's (recomputed) first maximum
        j = c0 + tl.program_id(0)
        mask, n, ih, iw = _positions(tl.program_id(1), MI, H, W, BLOCK)
        oc = (j % c0) * KG + j // c0
        xplane = (n * XC + j) * H * W
        if STRIDE == 1:
            d = tl.load(g_ptr + _out_offset(n, ih, iw, Ho, Wo, XC, oc), mask=mask, other=0.0).to(tl.float32)
        else:
            oh = ih // 2
            ow = iw // 2
            _, idx = _pc_pool2(x_ptr, xplane, oh, ow, H, W, mask)
            go = tl.load(g_ptr + _out_offset(n, oh, ow, Ho, Wo, XC, oc), mask=mask, other=0.0).to(tl.float32)
            d = tl.where(idx == (ih % 2) * 2 + iw % 2, go, 0.0)
        tl.store(dx_ptr + xplane + ih * W + iw, d.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launches
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


def _launch(kernel: str, grid, args, nbytes, run: bool, **constexprs) -> None:
    """Launch ``kernel`` (when ``run``; the fake implementations only report it) with its num_warps from
    :data:`LAUNCH_CONFIG`, and report it to the observers."""
    num_warps = LAUNCH_CONFIG[kernel][1]
    if _OBSERVERS and (run or torch._guards.TracingContext.try_get() is None):
        rec = Launch(kernel, tuple(int(g) for g in grid), int(nbytes),
                     tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args),
                     tuple(sorted(constexprs.items())), num_warps)
        for fn in tuple(_OBSERVERS):
            fn(rec)
    if run:
        globals()[kernel][tuple(grid)](*args, num_warps=num_warps, **constexprs)


# ------------------------------------------------------------------------------------------------ the edge
_LAYOUTS: dict = {}
_SLOTS: dict = {}


def _layout(ops, stride):
    """(HAS_SKIP, HAS_AVG, HAS_MAX, conv op names, the weight slot of each op).

    Weight slots: 0 skip (stride 1), 1 avg pool, 2 max pool, 3+k conv branch k, 3+K 'none' (unused)."""
    key = (tuple(ops), int(stride))
    if key not in _LAYOUTS:
        conv_names = []
        for name in ops:
            if is_conv_branch(name, stride) and name not in conv_names:
                conv_names.append(name)
        K = len(conv_names)
        slot = []
        for name in ops:
            if name == "none":
                slot.append(3 + K)
            elif name == "skip_connect" and stride == 1:
                slot.append(0)
            elif name == "avg_pool_3x3":
                slot.append(1)
            elif name == "max_pool_3x3":
                slot.append(2)
            else:
                slot.append(3 + conv_names.index(name))
        _LAYOUTS[key] = (0 in slot, 1 in slot, 2 in slot, tuple(conv_names), tuple(slot))
    return _LAYOUTS[key]


def _slot_index(slot: tuple, like: torch.Tensor) -> torch.Tensor:
    """The weight slots as an index tensor on ``like``'s device. Cached for real tensors (building it is a
    host-to-device copy, which would stall every step and cannot be captured in a CUDA graph); made afresh
    while torch.compile traces or on fake tensors (a cached real tensor does not mix with them)."""
    if torch.compiler.is_compiling() or _is_fake(like):
        return torch.tensor(slot, dtype=torch.long, device=like.device)
    key = (slot, str(like.device))
    if key not in _SLOTS:
        _SLOTS[key] = torch.tensor(slot, dtype=torch.long, device=like.device)
    return _SLOTS[key]


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


MAX_CONV = 8  # conv branches per edge the kernels take (DARTS has at most 5: 4 convs + the factorized reduce)


def _conv_args(convs, like):
    """The conv tensors as the kernels' eight pointer arguments (unused ones point at ``like``) and their dtype:
    the tensors themselves, not a stacked copy; mixed dtypes (rare) are brought to float32."""
    convs = list(convs)
    dt = convs[0].dtype if convs and all(c.dtype == convs[0].dtype for c in convs) else torch.float32
    convs = [c.to(dt).contiguous() for c in convs]
    return convs + [like] * (MAX_CONV - len(convs)), dt


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _forward(x, wvec, convs, stride, eps, pool_bn, k, has_skip, has_avg, has_max, run):
    """Forward passes: (out, mean, rstd). ``run`` False: allocate and report the launches, launch nothing."""
    x = x.contiguous()
    N, XC, H, W = x.shape
    C = XC // k  # channels through the mixed op
    Ho, Wo = -(-H // stride), -(-W // stride)
    M = N * Ho * Wo
    K = len(convs)
    cv, cdt = _conv_args(convs, x)
    S = 2 + K
    mean = _empty((S, C), torch.float32, x.device)
    rstd = _empty((S, C), torch.float32, x.device)
    flags = dict(HAS_AVG=has_avg, HAS_MAX=has_max, POOL_BN=pool_bn, K=K)
    e = x.element_size()
    X, O, CV = N * C * H * W * e, N * C * Ho * Wo * e, N * C * Ho * Wo * _size(cdt)
    pools = has_avg or has_max
    if (pool_bn and pools) or K:  # else no op has a BN: mean and rstd go unread
        B = _block(M, "_fwd_stats_kernel")
        T = _cdiv(M, B)
        part = _empty((C, T, 2 * S), torch.float32, x.device)
        _launch("_fwd_stats_kernel", (C, T), (x, *cv, part, C, XC, H, W, Ho, Wo, M, T),
                (X if pool_bn and pools else 0) + K * CV, run, STRIDE=stride, BLOCK=B, **flags)
        _launch("_fwd_finalize_kernel", (C,), (part, x, *cv, mean, rstd, C, H, W, Ho, Wo, M, T, float(eps)), 0, run,
                BT=_tiles(T, "_fwd_finalize_kernel"), **flags)
    out = _empty((N, XC, Ho, Wo), x.dtype, x.device)
    B = _block(M, "_fwd_out_kernel")
    _launch("_fwd_out_kernel", (C, _cdiv(M, B)), (x, *cv, wvec, mean, rstd, out, C, XC, XC, k, H, W, Ho, Wo, M),
            (X if pools or has_skip else 0) + K * CV + O, run, HAS_SKIP=has_skip, STRIDE=stride, BLOCK=B, **flags)
    if k > 1:
        B = _block(M, "_pc_bypass_fwd_kernel")
        _launch("_pc_bypass_fwd_kernel", (XC - C, _cdiv(M, B)), (x, out, C, XC, k, H, W, Ho, Wo, M),
                N * (XC - C) * (H * W + Ho * Wo) * e, run, STRIDE=stride, BLOCK=B)
    return out, mean, rstd


def _backward(g, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max, run):
    """Backward passes: (dx, dwc [C, 4+K]: each channel's share of the weight-slot gradients, conv gradients)."""
    x, g = x.contiguous(), g.contiguous()
    N, XC, H, W = x.shape
    C = XC // k
    Ho, Wo = g.shape[2], g.shape[3]
    M, MI = N * Ho * Wo, N * H * W
    K = len(convs)
    cv, cdt = _conv_args(convs, x)
    flags = dict(HAS_SKIP=has_skip, HAS_AVG=has_avg, HAS_MAX=has_max, POOL_BN=pool_bn, K=K, STRIDE=stride)
    e, eg = x.element_size(), g.element_size()
    X, G, CV = N * C * H * W * e, N * C * Ho * Wo * eg, N * C * Ho * Wo * _size(cdt)
    pools = has_avg or has_max
    B = _block(M, "_bwd_reduce_kernel")
    T = _cdiv(M, B)
    Q = 4 + K
    part = _empty((C, T, Q), torch.float32, x.device)
    _launch("_bwd_reduce_kernel", (C, T), (x, *cv, g, mean, rstd, part, C, XC, XC, k, H, W, Ho, Wo, M, T),
            G + (X if pools or has_skip else 0) + K * CV, run, BLOCK=B, **flags)
    mg = _empty((C,), torch.float32, x.device)
    mgy = _empty((2 + K, C), torch.float32, x.device)
    dwc = _empty((C, Q), torch.float32, x.device)  # per channel: [skip, avg, max, conv_0..K-1, none]
    _launch("_bwd_finalize_kernel", (C,), (part, mg, mgy, dwc, C, M, T), 0, run, K=K,
            BT=_tiles(T, "_bwd_finalize_kernel"))
    dx = _empty((N, XC, H, W), x.dtype, x.device)
    dconvs = [_empty((N, C, Ho, Wo), cdt, x.device) for _ in range(K)]
    B = _block(max(M, MI), "_bwd_grad_kernel")
    # conv gradients: g, each conv output and its gradient at output positions; dx: g gathered (skip, pools), x
    # (the pools' windows), dx written
    _launch("_bwd_grad_kernel", (C, _cdiv(max(M, MI), B)),
            (x, *cv, g, wvec, mean, rstd, mg, mgy, dx, *(dconvs + [dx] * (MAX_CONV - K)), C, XC, XC, k, H, W, Ho, Wo,
             M, MI), (G + 2 * K * CV if K else 0) + (G if pools or has_skip else 0) + (X if pools else 0) + X, run,
            BLOCK=B, **flags)
    if k > 1:
        B = _block(MI, "_pc_bypass_bwd_kernel")
        _launch("_pc_bypass_bwd_kernel", (XC - C, _cdiv(MI, B)), (x, g, dx, C, XC, k, H, W, Ho, Wo, MI),
                N * (XC - C) * (Ho * Wo * eg + (2 if stride == 2 else 1) * H * W * e), run, STRIDE=stride, BLOCK=B)
    return dx, dwc, [d.to(c.dtype) for d, c in zip(dconvs, convs)]


# ------------------------------------------------------------------------------------- registered operators
_FLAGS = "int stride, bool pool_bn, int k, bool has_skip, bool has_avg, bool has_max"


def _needs_triton():
    if triton is None:
        raise RuntimeError("triton is not installed: use the torch kernels")


@torch.library.custom_op("ktnas::mixed_op", mutates_args=(),
                         schema="(Tensor x, Tensor wvec, Tensor[] convs, float eps, " + _FLAGS
                                + ") -> (Tensor, Tensor, Tensor)")
def _mixed_op(x, wvec, convs, eps, stride, pool_bn, k, has_skip, has_avg, has_max):
    """The fused mixed op's forward: (out, mean, rstd [2+K, C/k] of the BN streams avg, max, conv_0..K-1).

    x [N, XC, H, W]; wvec [4+K] float32: the op weights summed into the slots (skip, avg, max, conv_0..K-1,
    none); convs: the K conv branches' pre-BN outputs [N, XC/k, Ho, Wo]; k > 1: PC-DARTS' partial channels."""
    _needs_triton()
    return _forward(x, wvec, convs, stride, eps, pool_bn, k, has_skip, has_avg, has_max, run=True)


@_mixed_op.register_fake
def _mixed_op_fake(x, wvec, convs, eps, stride, pool_bn, k, has_skip, has_avg, has_max):
    return _forward(x, wvec, convs, stride, eps, pool_bn, k, has_skip, has_avg, has_max, run=False)


@torch.library.custom_op("ktnas::mixed_op_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, Tensor wvec, Tensor mean, Tensor rstd, Tensor[] convs, "
                                + _FLAGS + ") -> (Tensor, Tensor, Tensor[])")
def _mixed_op_backward(grad, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max):
    """The fused mixed op's backward: (dx, dwc [C/k, 4+K]: each channel's share of d wvec, the conv gradients)."""
    _needs_triton()
    return _backward(grad, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max, run=True)


@_mixed_op_backward.register_fake
def _mixed_op_backward_fake(grad, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max):
    return _backward(grad, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max, run=False)


def _setup_context(ctx, inputs, output):
    x, wvec, convs, _eps, *meta = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, wvec, mean, rstd, *convs)
    ctx.meta = tuple(meta)


def _autograd_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, wvec, mean, rstd, *convs = ctx.saved_tensors
    dx, dwc, dconvs = torch.ops.ktnas.mixed_op_backward(grad_out, x, wvec, mean, rstd, convs, *ctx.meta)
    return (dx, dwc.sum(dim=0), list(dconvs)) + (None,) * (len(ctx.meta) + 1)


_mixed_op.register_autograd(_autograd_backward, setup_context=_setup_context)

# ------------------------------------------------------------------------------------------------- FLOPs
WINDOW_FLOPS = 19  # one 3x3 window: 9 sums and 9 maxima (avg and max pool come from the same pass), 1 divide


def _fwd_flops(E, EB, stride, pool_bn, has_skip, has_avg, has_max, K) -> int:
    pools = has_avg or has_max
    n_bn = K + (has_avg + has_max if pool_bn else 0)
    n_ops = has_skip + has_avg + has_max + K
    stats = (WINDOW_FLOPS if pool_bn and pools else 0) + 4 * n_bn if n_bn else 0
    out = (WINDOW_FLOPS if pools else 0) + 2 * n_bn + 2 * n_ops
    return E * (stats + out) + (3 * EB if stride == 2 else 0)


def _bwd_flops(E, EI, EB, stride, pool_bn, has_skip, has_avg, has_max, K) -> int:
    pools = has_avg or has_max
    n_bn = K + (has_avg + has_max if pool_bn else 0)
    n_ops = has_skip + has_avg + has_max + K
    reduce = (WINDOW_FLOPS if pools else 0) + 2 * n_bn + 2 * n_ops + 1
    grad_out = 6 * K
    grad_in = 2 * has_skip + (9 * (WINDOW_FLOPS + 6 * (has_avg + has_max)) if pools else 0)
    return E * (reduce + grad_out) + EI * grad_in + (3 * EB if stride == 2 else 0)


def _register_flops():
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.ktnas.mixed_op)
    def _(x, wvec, convs, eps, stride, pool_bn, k, has_skip, has_avg, has_max, *a, out_shape=None, **kw) -> int:
        """FLOPs of the fused forward passes: their elementwise arithmetic, roughly, per output element E of the
        channels through the mixed op (N * C/k * Ho * Wo): the statistics pass 4 per batch-normalised stream
        (shift, square, two sums) plus a 3x3 window (:data:`WINDOW_FLOPS`) when the pools have a BN; the output
        pass a window when there are pools, 2 per BN stream (normalise) and 2 per op (weight, accumulate);
        PC-DARTS' bypass 3 per bypassed output element at stride 2 (2x2 max), none at stride 1 (a copy)."""
        N, XC, H, W = x
        Ho, Wo = -(-H // stride), -(-W // stride)
        return _fwd_flops(N * XC // k * Ho * Wo, N * (XC - XC // k) * Ho * Wo, stride, pool_bn, has_skip,
                          has_avg, has_max, len(convs))

    @register_flop_formula(torch.ops.ktnas.mixed_op_backward)
    def _(g, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max, *a, out_shape=None,
          **kw) -> int:
        """FLOPs of the fused backward passes, roughly, per output element E and input element EI of the
        channels through the mixed op: the reduce pass a window when there are pools, 2 per BN stream, 2 per op
        and 1 (sum of g); the gradient pass 6 per conv branch (E) and, per input element, 2 for skip and, with
        pools, 9 windows (each recomputed) plus 6 per pool per window (EI); PC-DARTS' bypass 3 per bypassed
        input element at stride 2."""
        N, XC, H, W = x
        C = XC // k
        return _bwd_flops(N * C * g[2] * g[3], N * C * H * W, N * (XC - C) * H * W, stride, pool_bn, has_skip,
                          has_avg, has_max, len(convs))


_register_flops()


# ------------------------------------------------------------------------------------------------ public API
def _apply(x, weights, ops, stride, eps, pool_bn, k, convs):
    """The registered op on one edge: the weights summed into the kernels' slots (differentiable: the weight
    gradients come back through this ``index_add``), then the fused forward."""
    has_skip, has_avg, has_max, conv_names, slot = _layout(ops, stride)
    wvec = weights.new_zeros(4 + len(conv_names), dtype=torch.float32).index_add(
        0, _slot_index(slot, weights), weights.to(torch.float32))
    out, _, _ = torch.ops.ktnas.mixed_op(x, wvec, list(convs), float(eps), int(stride), bool(pool_bn), int(k),
                                        has_skip, has_avg, has_max)
    return out


def _conv_list(conv_outs: dict, ops, stride: int, shape) -> list:
    """The conv branches' pre-BN outputs in the kernels' order, checked like the reference checks them."""
    conv_names = _layout(ops, stride)[3]
    if len(conv_names) > MAX_CONV:
        raise ValueError(f"the Triton mixed op takes at most {MAX_CONV} conv branches per edge, got {len(conv_names)}")
    convs = []
    for name in conv_names:
        if name not in conv_outs:
            raise ValueError(f"conv_outs lacks the pre-BN output of conv branch {name!r} (stride {stride})")
        y = conv_outs[name]
        if tuple(y.shape) != shape:
            raise ValueError(f"conv_outs[{name!r}] has shape {tuple(y.shape)}, expected {shape}")
        convs.append(y)
    return convs


def _check_triton(x, weights, ops, stride):
    if triton is None:
        raise RuntimeError("triton is not installed: use the torch kernels")
    _check(x, weights, ops, stride)
    if x.dtype not in DTYPES:
        raise ValueError(f"the Triton mixed op takes float32, float16 or bfloat16 inputs, got {x.dtype}")


def mixed_op_triton(x: torch.Tensor, weights: torch.Tensor, conv_outs: dict, ops, stride: int,
                    eps: float = 1e-5, *, pool_bn: bool = True) -> torch.Tensor:
    """Fused 'full' mixed op: same semantics, arguments and errors as ``mixed_op_reference`` (see reference.py).

    x: [N, C, H, W] float32 / float16 / bfloat16 (CUDA, or CPU under TRITON_INTERPRET=1). weights: [len(ops)].
    conv_outs: {op name: pre-BN output [N, C, ceil(H/stride), ceil(W/stride)]} for every conv branch in ops.
    Differentiable in x, weights and every conv_outs entry.
    """
    _check_triton(x, weights, ops, stride)
    convs = _conv_list(conv_outs, ops, stride, _out_shape(x, stride))
    return _apply(x, weights, tuple(ops), int(stride), eps, pool_bn, 1, convs)


def mixed_op_triton_gdas(x: torch.Tensor, weights: torch.Tensor, index: int, conv_outs: dict, ops, stride: int,
                         eps: float = 1e-5, *, pool_bn: bool = True) -> torch.Tensor:
    """Fused GDAS edge, as ``mixed_op_reference_gdas``: ``weights[index] * op_index(x)``, only the sampled op
    computed (the kernels run with that one op: a pool costs one window pass, a conv branch its BN; 'none' is a
    zero tensor, not connected to ``x``, as in the reference). The gradient reaches ``weights[index]`` alone, and
    through the straight-through Gumbel vector every logit."""
    _check_triton(x, weights, ops, stride)
    index = int(index)
    if not 0 <= index < len(ops):
        raise ValueError(f"index {index} out of range for {len(ops)} ops")
    op, shape = (ops[index],), _out_shape(x, stride)
    if op[0] == "none":
        return weights[index] * x.new_zeros(shape)
    convs = _conv_list(conv_outs, op, stride, shape)
    return _apply(x, weights[index:index + 1], op, int(stride), eps, pool_bn, 1, convs)


def mixed_op_triton_pc(x: torch.Tensor, weights: torch.Tensor, conv_outs: dict, ops, stride: int, k: int = 4,
                       eps: float = 1e-5, *, pool_bn: bool = True) -> torch.Tensor:
    """Fused PC-DARTS edge, as ``mixed_op_reference_pc``: the mixed op on the first C/k channels (conv_outs built
    for C/k channels), the bypass (identity, or 2x2 max pool with ceil mode at stride 2) of the rest, and the
    channel shuffle, all written by the kernels straight to their final places: no concatenation, no shuffle
    copy."""
    _check_triton(x, weights, ops, stride)
    N, C, H, W = x.shape
    if k < 1 or C % k:
        raise ValueError(f"channels ({C}) must be divisible by the partial-channel factor k ({k})")
    shape = (N, C // k, -(-H // stride), -(-W // stride))
    convs = _conv_list(conv_outs, ops, stride, shape)
    return _apply(x, weights, tuple(ops), int(stride), eps, pool_bn, int(k), convs)


def fused_bytes(shape, dtype: torch.dtype, ops, stride: int = 1, pool_bn: bool = True, k: int = 1) -> int:
    """Bytes the fused kernels read and write for one forward + backward of an edge with input ``shape``
    (``k`` > 1: PC-DARTS): the sum of :attr:`Launch.nbytes` over the launches the op issues, counted on fake
    tensors (nothing runs, triton need not be installed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    N, C, H, W = shape
    Ho, Wo = -(-H // stride), -(-W // stride)
    with FakeTensorMode(), count_launches() as counts:
        x = torch.empty(shape, dtype=dtype, requires_grad=True)
        w = torch.empty(len(ops), requires_grad=True)
        convs = [torch.empty(N, C // k, Ho, Wo, dtype=dtype, requires_grad=True)
                 for _ in _layout(tuple(ops), stride)[3]]
        out = _apply(x, w, tuple(ops), stride, 1e-5, pool_bn, k, convs)
        out.backward(torch.empty_like(out))
    return counts.bytes
