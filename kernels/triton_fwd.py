"""The fused mixed op's forward kernels (launched by ``triton_passes.forward``; see ``triton_mixed.py``).

``_fwd_stats_kernel``: per (channel, tile) partial sums and sums of squares (shifted by the channel's first value,
for a stable variance) of the pooled values (when POOL_BN) and of every conv output, into an fp32 buffer
[C, T, 2*(2+K)]; ``_fwd_finalize_kernel`` (one program per channel) sums the tiles into the per-channel mean / rstd
[2+K, C]. ``_fwd_out_kernel``: recomputes the pools, normalises, weights and sums; writes only ``out`` (PC-DARTS:
at the channel-shuffled places, ``_pc_bypass_fwd_kernel`` writing the bypassed channels).

:data:`KERNELS` maps each kernel's name to its ``@triton.jit`` function (empty without triton).
"""
from __future__ import annotations

from .triton_jit import tl, triton  # None without triton; KERNELS is empty then

KERNELS: dict = {}

if triton is not None:
    from .triton_jit import conv_ptr, hat, out_offset, out_positions, pc_pool2, pools_hat, positions, tile_sum, window

    @triton.jit
    def _shift(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, s: tl.constexpr, c, H, W, Ho, Wo):
        """The value stream ``s`` of channel ``c`` is shifted by before its sums of squares (a stable variance):
        the channel's first input value for the pools, the first value of conv output k for s = 2 + k."""
        if s < 2:
            v = tl.load(x_ptr + c * H * W).to(tl.float32)
        else:
            v = tl.load(conv_ptr(s - 2, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7) + c * Ho * Wo).to(tl.float32)
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
        t = tl.program_id(0)  # tiles on axis 0 (up to 2**31 - 1 programs), channels on axis 1
        c = tl.program_id(1)
        mask, n, oh, ow, oplane = out_positions(t, M, C, c, Ho, Wo, BLOCK)
        Q: tl.constexpr = 2 * (2 + K)
        base = part_ptr + (c * T + t) * Q
        if POOL_BN and (HAS_AVG or HAS_MAX):
            avg, mx, _ = window(x_ptr, (n * XC + c) * H * W, oh, ow, H, W, STRIDE, mask)
        if POOL_BN and HAS_AVG:
            _moments(base, 0, avg - _shift(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, 0, c, H, W, Ho, Wo), mask)
        else:
            _moments(base, 0, tl.zeros((BLOCK,), dtype=tl.float32), mask)
        if POOL_BN and HAS_MAX:
            _moments(base, 1, mx - _shift(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, 1, c, H, W, Ho, Wo), mask)
        else:
            _moments(base, 1, tl.zeros((BLOCK,), dtype=tl.float32), mask)
        for k in tl.static_range(K):
            cp = conv_ptr(k, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7)
            y = tl.load(cp + oplane, mask=mask, other=0.0).to(tl.float32)
            _moments(base, 2 + k, y - _shift(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, 2 + k, c, H, W, Ho, Wo),
                     mask)

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
                m1 = tile_sum(part_ptr, c, T, Q, 2 * s, BT) / M
                var = tl.maximum(tile_sum(part_ptr, c, T, Q, 2 * s + 1, BT) / M - m1 * m1, 0.0)
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
        t = tl.program_id(0)  # tiles on axis 0 (up to 2**31 - 1 programs), channels on axis 1
        c = tl.program_id(1)
        mask, n, oh, ow, oplane = out_positions(t, M, C, c, Ho, Wo, BLOCK)
        xplane = (n * XC + c) * H * W
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        if HAS_SKIP:  # stride 1: output and input positions coincide
            acc += tl.load(w_ptr + 0) * tl.load(x_ptr + xplane + oh * W + ow, mask=mask, other=0.0).to(tl.float32)
        if HAS_AVG or HAS_MAX:
            avg, mx = pools_hat(x_ptr, xplane, oh, ow, H, W, STRIDE, mask, mean_ptr, rstd_ptr, C, c, POOL_BN)
            if HAS_AVG:
                acc += tl.load(w_ptr + 1) * avg
            if HAS_MAX:
                acc += tl.load(w_ptr + 2) * mx
        for k in tl.static_range(K):
            cp = conv_ptr(k, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7)
            y = tl.load(cp + oplane, mask=mask, other=0.0).to(tl.float32)
            y = hat(y, mean_ptr, rstd_ptr, 2 + k, C, c)
            acc += tl.load(w_ptr + 3 + k) * y
        tl.store(out_ptr + out_offset(n, oh, ow, Ho, Wo, OC, c * OMUL), acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pc_bypass_fwd_kernel(x_ptr, out_ptr, c0, XC, KG, H, W, Ho, Wo, M, STRIDE: tl.constexpr,
                              BLOCK: tl.constexpr):
        # channel j >= c0 of x bypasses the mixed op (identity, or 2x2 max pool at stride 2) and lands at its
        # channel-shuffled place: concat channel j = g*c0 + i goes to output channel i*KG + g
        j = c0 + tl.program_id(1)
        mask, n, oh, ow = positions(tl.program_id(0), M, Ho, Wo, BLOCK)
        xplane = (n * XC + j) * H * W
        if STRIDE == 1:
            v = tl.load(x_ptr + xplane + oh * W + ow, mask=mask, other=0.0)
        else:
            v, _ = pc_pool2(x_ptr, xplane, oh, ow, H, W, mask)
        oc = (j % c0) * KG + j // c0
        tl.store(out_ptr + out_offset(n, oh, ow, Ho, Wo, XC, oc), v.to(out_ptr.dtype.element_ty), mask=mask)

    KERNELS.update(_fwd_stats_kernel=_fwd_stats_kernel, _fwd_finalize_kernel=_fwd_finalize_kernel,
                   _fwd_out_kernel=_fwd_out_kernel, _pc_bypass_fwd_kernel=_pc_bypass_fwd_kernel)
