"""Fused Triton kernels for the 'full' mixed operation (DARTS / NAS-Bench-201), forward and backward.

Same semantics as :func:`ktnas.kernels.reference.mixed_op_reference` (the specification): ``out = sum_k w_k op_k(x)``
with the parameter-free ops (none, skip_connect at stride 1, 3x3 avg pool with count_include_pad=False, 3x3 max
pool; padding 1; stride 1 or 2) computed inside the kernels from ``x``, the affine-free batch norm (batch
statistics, biased variance) after pools when ``pool_bn`` and after every conv branch (pre-BN output given in
``conv_outs``), and the weighted sum. Inputs float32, bfloat16 or float16; arithmetic in float32; the output in
the dtype of ``x``.

Passes (the elementwise kernels run one program per (channel, tile of BLOCK flat positions); the conv outputs are
passed as separate pointers, never stacked into a copy). Where they live: the kernels in ``triton_fwd.py`` and
``triton_bwd.py`` (their shared ``@triton.jit`` helpers in ``triton_jit.py``), the host passes that launch them in
``triton_passes.py``, the launch bookkeeping in ``launches.py``; this module holds the registered operator, its
autograd formula and FLOP formulas, and the public functions.

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
one edge. :func:`mixed_op_triton`, :func:`mixed_op_triton_gdas` and :func:`mixed_op_triton_pc` take the reference's
arguments, ``(x, weights, conv_outs, ops, stride, *, pool_bn, index, k, eps)``.

Import this module only after setting ``TRITON_INTERPRET=1`` if you want the interpreter (CPU tensors).
"""
from __future__ import annotations

import os

import torch

from .launches import KERNELS, LAUNCH_CONFIG, Launch, LaunchCounts, count_launches, observe_launches
from .reference import check_args, check_index, check_k, out_shape
from .triton_passes import MAX_CONV, backward, forward, layout, slot_index

try:  # the module imports without triton; available() then says False
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["DTYPES", "KERNELS", "LAUNCH_CONFIG", "Launch", "LaunchCounts", "MAX_CONV", "available", "count_launches",
           "fused_bytes", "mixed_op_triton", "mixed_op_triton_gdas", "mixed_op_triton_pc", "observe_launches"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    return forward(x, wvec, convs, stride, eps, pool_bn, k, has_skip, has_avg, has_max, run=True)


@_mixed_op.register_fake
def _mixed_op_fake(x, wvec, convs, eps, stride, pool_bn, k, has_skip, has_avg, has_max):
    return forward(x, wvec, convs, stride, eps, pool_bn, k, has_skip, has_avg, has_max, run=False)


@torch.library.custom_op("ktnas::mixed_op_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, Tensor wvec, Tensor mean, Tensor rstd, Tensor[] convs, "
                                + _FLAGS + ") -> (Tensor, Tensor, Tensor[])")
def _mixed_op_backward(grad, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max):
    """The fused mixed op's backward: (dx, dwc [C/k, 4+K]: each channel's share of d wvec, the conv gradients)."""
    _needs_triton()
    return backward(grad, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max, run=True)


@_mixed_op_backward.register_fake
def _mixed_op_backward_fake(grad, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max):
    return backward(grad, x, wvec, mean, rstd, convs, stride, pool_bn, k, has_skip, has_avg, has_max, run=False)


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
    has_skip, has_avg, has_max, conv_names, slot = layout(ops, stride)
    wvec = weights.new_zeros(4 + len(conv_names), dtype=torch.float32).index_add(
        0, slot_index(slot, weights), weights.to(torch.float32))
    out, _, _ = torch.ops.ktnas.mixed_op(x, wvec, list(convs), float(eps), int(stride), bool(pool_bn), int(k),
                                        has_skip, has_avg, has_max)
    return out


def _conv_list(conv_outs: dict, ops, stride: int, shape) -> list:
    """The conv branches' pre-BN outputs in the kernels' order, checked like the reference checks them."""
    conv_names = layout(ops, stride)[3]
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
    check_args(x, weights, ops, stride)
    if x.dtype not in DTYPES:
        raise ValueError(f"the Triton mixed op takes float32, float16 or bfloat16 inputs, got {x.dtype}")


def mixed_op_triton(x: torch.Tensor, weights: torch.Tensor, conv_outs: dict, ops, stride: int, *,
                    pool_bn: bool = True, index: int | None = None, k: int = 4, eps: float = 1e-5) -> torch.Tensor:
    """Fused 'full' mixed op: same semantics, arguments and errors as ``mixed_op_reference`` (see reference.py).

    x: [N, C, H, W] float32 / float16 / bfloat16 (CUDA, or CPU under TRITON_INTERPRET=1). weights: [len(ops)].
    conv_outs: {op name: pre-BN output [N, C, ceil(H/stride), ceil(W/stride)]} for every conv branch in ops.
    Differentiable in x, weights and every conv_outs entry. ``index`` and ``k`` are not used.
    """
    _check_triton(x, weights, ops, stride)
    convs = _conv_list(conv_outs, ops, stride, out_shape(x, stride))
    return _apply(x, weights, tuple(ops), int(stride), eps, pool_bn, 1, convs)


def mixed_op_triton_gdas(x: torch.Tensor, weights: torch.Tensor, conv_outs: dict, ops, stride: int, *,
                         pool_bn: bool = True, index: int | None = None, k: int = 4,
                         eps: float = 1e-5) -> torch.Tensor:
    """Fused GDAS edge, as ``mixed_op_reference_gdas``: ``weights[index] * op_index(x)``, only the sampled op
    computed (the kernels run with that one op: a pool costs one window pass, a conv branch its BN; 'none' is a
    zero tensor, not connected to ``x``, as in the reference). The gradient reaches ``weights[index]`` alone, and
    through the straight-through Gumbel vector every logit. ``index`` is required; ``k`` is not used."""
    _check_triton(x, weights, ops, stride)
    index = check_index(index, ops)
    op, shape = (ops[index],), out_shape(x, stride)
    if op[0] == "none":
        return weights[index] * x.new_zeros(shape)
    convs = _conv_list(conv_outs, op, stride, shape)
    return _apply(x, weights[index:index + 1], op, int(stride), eps, pool_bn, 1, convs)


def mixed_op_triton_pc(x: torch.Tensor, weights: torch.Tensor, conv_outs: dict, ops, stride: int, *,
                       pool_bn: bool = True, index: int | None = None, k: int = 4,
                       eps: float = 1e-5) -> torch.Tensor:
    """Fused PC-DARTS edge, as ``mixed_op_reference_pc``: the mixed op on the first C/k channels (conv_outs built
    for C/k channels), the bypass (identity, or 2x2 max pool with ceil mode at stride 2) of the rest, and the
    channel shuffle, all written by the kernels straight to their final places: no concatenation, no shuffle
    copy. ``index`` is not used."""
    _check_triton(x, weights, ops, stride)
    N, C, H, W = x.shape
    check_k(C, k)
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
                 for _ in layout(tuple(ops), stride)[3]]
        out = _apply(x, w, tuple(ops), stride, 1e-5, pool_bn, k, convs)
        out.backward(torch.empty_like(out))
    return counts.bytes
