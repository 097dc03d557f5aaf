"""Host side of the fused mixed op: an edge's layout (which ops it has, the weight slot of each), the conv
tensors as the kernels' pointer arguments, and the forward and backward passes -- the sequence of launches, with
their grids, tile widths and the bytes each moves (``launches.py``). ``run`` False (the registered op's fake
implementations): allocate the outputs and report the launches, launch nothing.

Forward: ``_fwd_stats_kernel`` + ``_fwd_finalize_kernel`` (the BN statistics; skipped when no op has a BN), then
``_fwd_out_kernel`` (PC-DARTS: and ``_pc_bypass_fwd_kernel``). Backward: ``_bwd_reduce_kernel`` +
``_bwd_finalize_kernel``, then ``_bwd_grad_kernel`` (PC-DARTS: and ``_pc_bypass_bwd_kernel``).
"""
from __future__ import annotations

import torch

from .launches import block, cdiv, empty, launch, tiles
from .reference import is_conv_branch

_LAYOUTS: dict = {}
_SLOTS: dict = {}


def layout(ops, stride):
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


def slot_index(slot: tuple, like: torch.Tensor) -> torch.Tensor:
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


def forward(x, wvec, convs, stride, eps, pool_bn, k, has_skip, has_avg, has_max, run):
    """Forward passes: (out, mean, rstd). ``run`` False: allocate and report the launches, launch nothing."""
    x = x.contiguous()
    N, XC, H, W = x.shape
    C = XC // k  # channels through the mixed op
    Ho, Wo = -(-H // stride), -(-W // stride)
    M = N * Ho * Wo
    K = len(convs)
    cv, cdt = _conv_args(convs, x)
    S = 2 + K
    mean = empty((S, C), torch.float32, x.device)
    rstd = empty((S, C), torch.float32, x.device)
    flags = dict(HAS_AVG=has_avg, HAS_MAX=has_max, POOL_BN=pool_bn, K=K)
    e = x.element_size()
    X, O, CV = N * C * H * W * e, N * C * Ho * Wo * e, N * C * Ho * Wo * _size(cdt)
    pools = has_avg or has_max
    if (pool_bn and pools) or K:  # else no op has a BN: mean and rstd go unread
        B = block(M, "_fwd_stats_kernel")
        T = cdiv(M, B)
        part = empty((C, T, 2 * S), torch.float32, x.device)
        launch("_fwd_stats_kernel", (T, C), (x, *cv, part, C, XC, H, W, Ho, Wo, M, T),
                (X if pool_bn and pools else 0) + K * CV, run, STRIDE=stride, BLOCK=B, **flags)
        launch("_fwd_finalize_kernel", (C,), (part, x, *cv, mean, rstd, C, H, W, Ho, Wo, M, T, float(eps)), 0, run,
                BT=tiles(T, "_fwd_finalize_kernel"), **flags)
    out = empty((N, XC, Ho, Wo), x.dtype, x.device)
    B = block(M, "_fwd_out_kernel")
    launch("_fwd_out_kernel", (cdiv(M, B), C), (x, *cv, wvec, mean, rstd, out, C, XC, XC, k, H, W, Ho, Wo, M),
            (X if pools or has_skip else 0) + K * CV + O, run, HAS_SKIP=has_skip, STRIDE=stride, BLOCK=B, **flags)
    if k > 1:
        B = block(M, "_pc_bypass_fwd_kernel")
        launch("_pc_bypass_fwd_kernel", (cdiv(M, B), XC - C), (x, out, C, XC, k, H, W, Ho, Wo, M),
                N * (XC - C) * (H * W + Ho * Wo) * e, run, STRIDE=stride, BLOCK=B)
    return out, mean, rstd


def backward(g, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max, run):
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
    B = block(M, "_bwd_reduce_kernel")
    T = cdiv(M, B)
    Q = 4 + K
    part = empty((C, T, Q), torch.float32, x.device)
    launch("_bwd_reduce_kernel", (T, C), (x, *cv, g, mean, rstd, part, C, XC, XC, k, H, W, Ho, Wo, M, T),
            G + (X if pools or has_skip else 0) + K * CV, run, BLOCK=B, **flags)
    mg = empty((C,), torch.float32, x.device)
    mgy = empty((2 + K, C), torch.float32, x.device)
    dwc = empty((C, Q), torch.float32, x.device)  # per channel: [skip, avg, max, conv_0..K-1, none]
    launch("_bwd_finalize_kernel", (C,), (part, mg, mgy, dwc, C, M, T), 0, run, K=K,
            BT=tiles(T, "_bwd_finalize_kernel"))
    dx = empty((N, XC, H, W), x.dtype, x.device)
    dconvs = [empty((N, C, Ho, Wo), cdt, x.device) for _ in range(K)]
    B = block(max(M, MI), "_bwd_grad_kernel")
    # conv gradients: g, each conv output and its gradient at output positions; dx: g gathered (skip, pools), x
    # (the pools' windows), dx written
    launch("_bwd_grad_kernel", (cdiv(max(M, MI), B), C),
            (x, *cv, g, wvec, mean, rstd, mg, mgy, dx, *(dconvs + [dx] * (MAX_CONV - K)), C, XC, XC, k, H, W, Ho, Wo,
             M, MI), (G + 2 * K * CV if K else 0) + (G if pools or has_skip else 0) + (X if pools else 0) + X, run,
            BLOCK=B, **flags)
    if k > 1:
        B = block(MI, "_pc_bypass_bwd_kernel")
        launch("_pc_bypass_bwd_kernel", (cdiv(MI, B), XC - C), (x, g, dx, C, XC, k, H, W, Ho, Wo, MI),
                N * (XC - C) * (Ho * Wo * eg + (2 if stride == 2 else 1) * H * W * e), run, STRIDE=stride, BLOCK=B)
    return dx, dwc, [d.to(c.dtype) for d, c in zip(dconvs, convs)]
