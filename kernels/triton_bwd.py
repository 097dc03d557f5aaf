"""The fused mixed op's backward kernels (launched by ``triton_passes.backward``; see ``triton_mixed.py``).

``_bwd_reduce_kernel``: per (channel, tile) partial sums of g, g*x (skip) and g*yhat for every branch (yhat: the
branch's normalised output, recomputed); ``_bwd_finalize_kernel`` turns them into the BN-backward means and each
channel's share of dweights. ``_bwd_grad_kernel``: one elementwise pass computing, per tile, d conv_out_k =
w_k rstd_k (g - mean(g) - yhat_k mean(g yhat_k)) at output positions (:func:`_conv_grads`) and dx at input
positions (identity, plus a gather over the <= 9 output windows that contain the position: avg pool's share, and
max pool's gradient where the recomputed argmax -- the first maximum in row-major order, as PyTorch -- is this
position; :func:`_pools_dx`). ``_pc_bypass_bwd_kernel``: dx of PC-DARTS' bypassed channels.

:data:`KERNELS` maps each kernel's name to its ``@triton.jit`` function (empty without triton).
"""
from __future__ import annotations

from .triton_jit import tl, triton  # None without triton; KERNELS is empty then

KERNELS: dict = {}

if triton is not None:
    from .triton_jit import conv_ptr, hat, out_offset, out_positions, pc_pool2, pools_hat, positions, tile_sum, window

    @triton.jit
    def _bwd_reduce_kernel(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, g_ptr, mean_ptr, rstd_ptr, part_ptr, C, XC,
                           OC, OMUL, H, W, Ho, Wo, M, T,
                           HAS_SKIP: tl.constexpr, HAS_AVG: tl.constexpr, HAS_MAX: tl.constexpr,
                           POOL_BN: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        # partials [C, T, 4+K]: sum g, sum g*x (skip), sum g*yhat_avg, sum g*yhat_max, sum g*yhat_conv_k
        t = tl.program_id(0)  # tiles on axis 0 (up to 2**31 - 1 programs), channels on axis 1
        c = tl.program_id(1)
        mask, n, oh, ow, oplane = out_positions(t, M, C, c, Ho, Wo, BLOCK)
        Q: tl.constexpr = 4 + K
        base = part_ptr + (c * T + t) * Q
        xplane = (n * XC + c) * H * W
        g = tl.load(g_ptr + out_offset(n, oh, ow, Ho, Wo, OC, c * OMUL), mask=mask, other=0.0).to(tl.float32)
        tl.store(base + 0, tl.sum(g, axis=0))
        if HAS_SKIP:
            xv = tl.load(x_ptr + xplane + oh * W + ow, mask=mask, other=0.0).to(tl.float32)
            tl.store(base + 1, tl.sum(g * xv, axis=0))
        else:
            tl.store(base + 1, 0.0)
        if HAS_AVG or HAS_MAX:
            avg, mx = pools_hat(x_ptr, xplane, oh, ow, H, W, STRIDE, mask, mean_ptr, rstd_ptr, C, c, POOL_BN)
        if HAS_AVG:
            tl.store(base + 2, tl.sum(g * avg, axis=0))
        else:
            tl.store(base + 2, 0.0)
        if HAS_MAX:
            tl.store(base + 3, tl.sum(g * mx, axis=0))
        else:
            tl.store(base + 3, 0.0)
        for k in tl.static_range(K):
            cp = conv_ptr(k, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7)
            y = tl.load(cp + oplane, mask=mask, other=0.0).to(tl.float32)
            y = hat(y, mean_ptr, rstd_ptr, 2 + k, C, c)
            tl.store(base + 4 + k, tl.sum(g * y, axis=0))

    @triton.jit
    def _bwd_finalize_kernel(part_ptr, mg_ptr, mgy_ptr, dwc_ptr, C, M, T, K: tl.constexpr, BT: tl.constexpr):
        # per channel: mg = mean of g, mgy[s] = mean of g * yhat_s (the BN-backward means), and the channel's
        # share of the op-weight gradients dwc[c] = [skip, avg, max, conv_0..K-1, none (0)]
        c = tl.program_id(0)
        Q: tl.constexpr = 4 + K
        tl.store(mg_ptr + c, tile_sum(part_ptr, c, T, Q, 0, BT) / M)
        for q in tl.static_range(1, Q):
            total = tile_sum(part_ptr, c, T, Q, q, BT)
            tl.store(dwc_ptr + c * Q + q - 1, total)
            if q >= 2:
                tl.store(mgy_ptr + (q - 2) * C + c, total / M)
        tl.store(dwc_ptr + c * Q + Q - 1, 0.0)

    @triton.jit
    def _conv_grads(t, g_ptr, w_ptr, mean_ptr, rstd_ptr, mg, mgy_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7,
                    dc0, dc1, dc2, dc3, dc4, dc5, dc6, dc7, C, c, OC, OMUL, Ho, Wo, M,
                    K: tl.constexpr, BLOCK: tl.constexpr):
        """d conv_out_k = w_k rstd_k (g - mg - yhat_k mgy_k) at tile ``t`` of channel ``c``'s output positions."""
        mask, n, oh, ow, oplane = out_positions(t, M, C, c, Ho, Wo, BLOCK)
        g = tl.load(g_ptr + out_offset(n, oh, ow, Ho, Wo, OC, c * OMUL), mask=mask, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            mean = tl.load(mean_ptr + (2 + k) * C + c)
            rstd = tl.load(rstd_ptr + (2 + k) * C + c)
            cp = conv_ptr(k, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7)
            y = tl.load(cp + oplane, mask=mask, other=0.0).to(tl.float32)
            yh = (y - mean) * rstd
            d = tl.load(w_ptr + 3 + k) * rstd * (g - mg - yh * tl.load(mgy_ptr + (2 + k) * C + c))
            dp = conv_ptr(k, dc0, dc1, dc2, dc3, dc4, dc5, dc6, dc7)
            tl.store(dp + oplane, d.to(dp.dtype.element_ty), mask=mask)

    @triton.jit
    def _pools_dx(dx, x_ptr, g_ptr, plane, gplane, ih, iw, maski, w_ptr, mean_ptr, rstd_ptr, mg, mgy_ptr, C, c,
                  H, W, Ho, Wo, HAS_AVG: tl.constexpr, HAS_MAX: tl.constexpr, POOL_BN: tl.constexpr,
                  STRIDE: tl.constexpr):
        """``dx`` plus the pools' gradients at input positions (ih, iw): a gather over the <= 9 output windows
        holding each position (avg pool's share; max pool's where the recomputed argmax is the position)."""
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
                avg, mx, idx = window(x_ptr, plane, oh, ow, H, W, STRIDE, ok)
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
        return dx

    @triton.jit
    def _bwd_grad_kernel(x_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7, g_ptr, w_ptr, mean_ptr, rstd_ptr, mg_ptr,
                         mgy_ptr, dx_ptr, dc0, dc1, dc2, dc3, dc4, dc5, dc6, dc7,
                         C, XC, OC, OMUL, H, W, Ho, Wo, M, MI,
                         HAS_SKIP: tl.constexpr, HAS_AVG: tl.constexpr, HAS_MAX: tl.constexpr,
                         POOL_BN: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        # mg[c] = mean over (N, Ho, Wo) of g; mgy[s, c] = mean of g * yhat_s (s: avg, max, conv_0..K-1)
        t = tl.program_id(0)  # tiles on axis 0 (up to 2**31 - 1 programs), channels on axis 1
        c = tl.program_id(1)
        mg = tl.load(mg_ptr + c)
        if K > 0:  # d conv_out_k at output positions
            _conv_grads(t, g_ptr, w_ptr, mean_ptr, rstd_ptr, mg, mgy_ptr, cv0, cv1, cv2, cv3, cv4, cv5, cv6, cv7,
                        dc0, dc1, dc2, dc3, dc4, dc5, dc6, dc7, C, c, OC, OMUL, Ho, Wo, M, K, BLOCK)
        # -- dx at input positions
        maski, ni, ih, iw = positions(t, MI, H, W, BLOCK)
        plane = (ni * XC + c) * H * W
        gplane = (ni * OC + c * OMUL) * Ho * Wo
        dx = tl.zeros((BLOCK,), dtype=tl.float32)
        if HAS_SKIP:  # stride 1: Ho == H, Wo == W
            dx += tl.load(w_ptr + 0) * tl.load(g_ptr + gplane + ih * W + iw, mask=maski, other=0.0).to(tl.float32)
        if HAS_AVG or HAS_MAX:
            dx = _pools_dx(dx, x_ptr, g_ptr, plane, gplane, ih, iw, maski, w_ptr, mean_ptr, rstd_ptr, mg, mgy_ptr, C,
                           c, H, W, Ho, Wo, HAS_AVG, HAS_MAX, POOL_BN, STRIDE)
        tl.store(dx_ptr + plane + ih * W + iw, dx.to(dx_ptr.dtype.element_ty), mask=maski)

    @triton.jit
    def _pc_bypass_bwd_kernel(x_ptr, g_ptr, dx_ptr, c0, XC, KG, H, W, Ho, Wo, MI, STRIDE: tl.constexpr,
                              BLOCK: tl.constexpr):
        # dx of a bypass channel: the gradient of its shuffled output (stride 1), or, at stride 2, that of the
        # window holding the position when the position is the window's (recomputed) first maximum
        j = c0 + tl.program_id(1)
        mask, n, ih, iw = positions(tl.program_id(0), MI, H, W, BLOCK)
        oc = (j % c0) * KG + j // c0
        xplane = (n * XC + j) * H * W
        if STRIDE == 1:
            d = tl.load(g_ptr + out_offset(n, ih, iw, Ho, Wo, XC, oc), mask=mask, other=0.0).to(tl.float32)
        else:
            oh = ih // 2
            ow = iw // 2
            _, idx = pc_pool2(x_ptr, xplane, oh, ow, H, W, mask)
            go = tl.load(g_ptr + out_offset(n, oh, ow, Ho, Wo, XC, oc), mask=mask, other=0.0).to(tl.float32)
            d = tl.where(idx == (ih % 2) * 2 + iw % 2, go, 0.0)
        tl.store(dx_ptr + xplane + ih * W + iw, d.to(dx_ptr.dtype.element_ty), mask=mask)

    KERNELS.update(_bwd_reduce_kernel=_bwd_reduce_kernel, _bwd_finalize_kernel=_bwd_finalize_kernel,
                   _bwd_grad_kernel=_bwd_grad_kernel, _pc_bypass_bwd_kernel=_pc_bypass_bwd_kernel)
