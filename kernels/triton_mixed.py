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

Per edge and step that is 4-6 kernel launches forward and 3-4 backward, plus a few tiny torch ops (the weight
slots, the dweights sum). Not tuned on a GPU yet (the max-pool gather recomputes 9 windows per input element).

Import this module only after setting ``TRITON_INTERPRET=1`` if you want the interpreter (CPU tensors).
"""
from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

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


_MAX_BLOCK = 1024  # positions per program (tests lower it to get several tiles per channel)


def _block(m: int) -> int:
    return max(16, min(_MAX_BLOCK, triton.next_power_of_2(m)))


def _tiles(t: int) -> int:
    """Tiles a finalize program sums at once."""
    return max(16, min(1024, triton.next_power_of_2(t)))


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


_LAYOUTS: dict = {}


def _layout(ops, stride, device):
    """(HAS_SKIP, HAS_AVG, HAS_MAX, conv op names, index map of ops into the weight slots on ``device``).

    Weight slots: 0 skip (stride 1), 1 avg pool, 2 max pool, 3+k conv branch k, 3+K 'none' (unused).
    Cached: building the index tensor is a host-to-device copy, which would stall every step (and cannot be
    captured in a CUDA graph)."""
    key = (tuple(ops), int(stride), str(torch.device(device)))
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _build_layout(ops, stride, device)
    return _LAYOUTS[key]


def _build_layout(ops, stride, device):
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
    return (0 in slot, 1 in slot, 2 in slot, tuple(conv_names),
            torch.tensor(slot, dtype=torch.long, device=device))


MAX_CONV = 8  # conv branches per edge the kernels take (DARTS has at most 5: 4 convs + the factorized reduce)


def _conv_args(convs, like):
    """The conv tensors as the kernels' eight pointer arguments (unused ones point at ``like``) and their dtype:
    the tensors themselves, not a stacked copy; mixed dtypes (rare) are brought to float32."""
    convs = list(convs)
    if len(convs) > MAX_CONV:
        raise ValueError(f"the Triton mixed op takes at most {MAX_CONV} conv branches per edge, got {len(convs)}")
    dt = convs[0].dtype if convs and all(c.dtype == convs[0].dtype for c in convs) else torch.float32
    convs = [c.to(dt).contiguous() for c in convs]
    return convs + [like] * (MAX_CONV - len(convs)), dt


class MixedOpTriton(torch.autograd.Function):
    """Autograd wrapper: apply(x, weights, ops, stride, eps, pool_bn, k, *conv tensors in conv_names order).

    k == 1: the full mixed op. k > 1: PC-DARTS, the mixed op on the first C/k channels of x (the conv tensors
    have C/k channels), the other channels bypassing it, all written to their channel-shuffled places."""

    @staticmethod
    def forward(ctx, x, weights, ops, stride, eps, pool_bn, k, *convs):
        x = x.contiguous()
        N, XC, H, W = x.shape
        C = XC // k  # channels through the mixed op
        _, _, Ho, Wo = _out_shape(x, stride)
        M = N * Ho * Wo
        has_skip, has_avg, has_max, conv_names, slot = _layout(ops, stride, x.device)
        K = len(conv_names)
        wvec = torch.zeros(4 + K, dtype=torch.float32, device=x.device)
        wvec.index_add_(0, slot, weights.detach().to(torch.float32))
        cv, _ = _conv_args(convs, x)
        BLOCK = _block(M)
        T = triton.cdiv(M, BLOCK)
        S = 2 + K
        mean = _empty((S, C), torch.float32, x.device)
        rstd = _empty((S, C), torch.float32, x.device)
        flags = dict(HAS_AVG=has_avg, HAS_MAX=has_max, POOL_BN=bool(pool_bn), K=K)
        if (pool_bn and (has_avg or has_max)) or K:  # else no op has a BN: mean and rstd go unread
            part = _empty((C, T, 2 * S), torch.float32, x.device)
            _fwd_stats_kernel[(C, T)](x, *cv, part, C, XC, H, W, Ho, Wo, M, T, STRIDE=stride, BLOCK=BLOCK, **flags)
            _fwd_finalize_kernel[(C,)](part, x, *cv, mean, rstd, C, H, W, Ho, Wo, M, T, float(eps), BT=_tiles(T),
                                       **flags)
        out = _empty((N, XC, Ho, Wo), x.dtype, x.device)
        _fwd_out_kernel[(C, T)](x, *cv, wvec, mean, rstd, out, C, XC, XC, k, H, W, Ho, Wo, M, HAS_SKIP=has_skip,
                                STRIDE=stride, BLOCK=BLOCK, **flags)
        if k > 1:
            _pc_bypass_fwd_kernel[(XC - C, T)](x, out, C, XC, k, H, W, Ho, Wo, M, STRIDE=stride, BLOCK=BLOCK)
        ctx.save_for_backward(x, weights, wvec, slot, mean, rstd, *convs)
        ctx.meta = (stride, bool(pool_bn), has_skip, has_avg, has_max, K, k)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weights, wvec, slot, mean, rstd, *convs = ctx.saved_tensors
        stride, pool_bn, has_skip, has_avg, has_max, K, k = ctx.meta
        N, XC, H, W = x.shape
        C = XC // k
        Ho, Wo = grad_out.shape[2], grad_out.shape[3]
        M, MI = N * Ho * Wo, N * H * W
        g = grad_out.contiguous()
        cv, cdt = _conv_args(convs, x)
        flags = dict(HAS_SKIP=has_skip, HAS_AVG=has_avg, HAS_MAX=has_max, POOL_BN=pool_bn, K=K, STRIDE=stride)
        BLOCK = _block(M)
        T = triton.cdiv(M, BLOCK)
        Q = 4 + K
        part = _empty((C, T, Q), torch.float32, x.device)
        _bwd_reduce_kernel[(C, T)](x, *cv, g, mean, rstd, part, C, XC, XC, k, H, W, Ho, Wo, M, T, BLOCK=BLOCK,
                                   **flags)
        mg = _empty((C,), torch.float32, x.device)
        mgy = _empty((2 + K, C), torch.float32, x.device)
        dwc = _empty((C, Q), torch.float32, x.device)  # per channel: [skip, avg, max, conv_0..K-1, none]
        _bwd_finalize_kernel[(C,)](part, mg, mgy, dwc, C, M, T, K=K, BT=_tiles(T))
        dweights = dwc.sum(dim=0)[slot].to(weights.dtype)
        dx = _empty((N, XC, H, W), x.dtype, x.device)
        dconvs = [_empty((N, C, Ho, Wo), cdt, x.device) for _ in range(K)]
        BLOCK2 = _block(max(M, MI))
        _bwd_grad_kernel[(C, triton.cdiv(max(M, MI), BLOCK2))](
            x, *cv, g, wvec, mean, rstd, mg, mgy, dx, *(dconvs + [dx] * (MAX_CONV - K)), C, XC, XC, k, H, W, Ho,
            Wo, M, MI, BLOCK=BLOCK2, **flags)
        if k > 1:
            BLOCK3 = _block(MI)
            _pc_bypass_bwd_kernel[(XC - C, triton.cdiv(MI, BLOCK3))](x, g, dx, C, XC, k, H, W, Ho, Wo, MI,
                                                                     STRIDE=stride, BLOCK=BLOCK3)
        dconvs = [d.to(c.dtype) for d, c in zip(dconvs, convs)]
        return (dx, dweights, None, None, None, None, None, *dconvs)


def _conv_list(conv_outs: dict, ops, stride: int, shape) -> list:
    """The conv branches' pre-BN outputs in the kernels' order, checked like the reference checks them."""
    _, _, _, conv_names, _ = _layout(ops, stride, "cpu")
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
    return MixedOpTriton.apply(x, weights, tuple(ops), int(stride), float(eps), bool(pool_bn), 1, *convs)


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
    return MixedOpTriton.apply(x, weights[index:index + 1], op, int(stride), float(eps), bool(pool_bn), 1, *convs)


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
    return MixedOpTriton.apply(x, weights, tuple(ops), int(stride), float(eps), bool(pool_bn), int(k), *convs)
