"""The ``@triton.jit`` helpers the fused mixed op's forward (``triton_fwd.py``) and backward (``triton_bwd.py``)
kernels share: tile positions and offsets, the 3x3 pooling window, the normalisation with saved statistics, the
conv branches' pointers, the tile sums of the finalize passes and PC-DARTS' 2x2 bypass pool. Triton inlines them
into the kernels that call them. Defined only where triton is installed."""
from __future__ import annotations

try:  # the module imports without triton (nothing is defined then)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def window(x_ptr, plane, oh, ow, H, W, STRIDE: tl.constexpr, mask):
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
    def positions(t, MM, HH, WW, BLOCK: tl.constexpr):
        """Tile ``t`` of one channel's N*HH*WW positions: (mask, n, h, w)."""
        offs = t * BLOCK + tl.arange(0, BLOCK)
        n = (offs // (HH * WW)).to(tl.int64)
        r = offs % (HH * WW)
        return offs < MM, n, r // WW, r % WW

    @triton.jit
    def out_positions(t, M, C, c, Ho, Wo, BLOCK: tl.constexpr):
        """Tile ``t`` of channel ``c``'s N*Ho*Wo output positions: (mask, n, oh, ow, flat NCHW offset)."""
        mask, n, oh, ow = positions(t, M, Ho, Wo, BLOCK)
        return mask, n, oh, ow, out_offset(n, oh, ow, Ho, Wo, C, c)

    @triton.jit
    def out_offset(n, oh, ow, Ho, Wo, OC, oc):
        """Flat offset of (n, channel oc, oh, ow) in an [N, OC, Ho, Wo] output (or its gradient)."""
        return (n * OC + oc) * Ho * Wo + oh * Wo + ow

    @triton.jit
    def hat(v, mean_ptr, rstd_ptr, s, C, c):
        """Affine-free batch norm of stream ``s`` (0 avg pool, 1 max pool, 2+k conv k) of channel ``c``."""
        return (v - tl.load(mean_ptr + s * C + c)) * tl.load(rstd_ptr + s * C + c)

    @triton.jit
    def pools_hat(x_ptr, plane, oh, ow, H, W, STRIDE: tl.constexpr, mask, mean_ptr, rstd_ptr, C, c,
                  POOL_BN: tl.constexpr):
        """The two pools of the window at (oh, ow), batch-normalised with the saved statistics when POOL_BN."""
        avg, mx, _ = window(x_ptr, plane, oh, ow, H, W, STRIDE, mask)
        if POOL_BN:
            avg = hat(avg, mean_ptr, rstd_ptr, 0, C, c)
            mx = hat(mx, mean_ptr, rstd_ptr, 1, C, c)
        return avg, mx

    @triton.jit
    def conv_ptr(k: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
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
    def tile_sum(part_ptr, c, T, Q: tl.constexpr, q, BT: tl.constexpr):
        """Sum over the T tiles of channel ``c`` of partial ``q`` in a [C, T, Q] buffer."""
        acc = tl.zeros((BT,), dtype=tl.float32)
        for t0 in range(0, T, BT):
            offs = t0 + tl.arange(0, BT)
            acc += tl.load(part_ptr + (c * T + offs) * Q + q, mask=offs < T, other=0.0)
        return tl.sum(acc, axis=0)

    @triton.jit
    def pc_pool2(x_ptr, xplane, oh, ow, H, W, mask):
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
