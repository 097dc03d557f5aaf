"""PyTorch reference of the fused mixed operation: the specification of the kernel contract, and the CPU path.

An edge computes ``out = sum_k w_k * op_k(x)`` over the op names ``ops``, with ``w`` aligned to ``ops``:

- ``none``: 0 (contributes nothing).
- ``skip_connect`` at stride 1: ``x``.
- ``avg_pool_3x3`` (padding 1, count_include_pad=False) and ``max_pool_3x3`` (padding 1), stride 1 or 2, then an
  affine-free batch norm when ``pool_bn`` (DARTS, whose MixedOp appends BatchNorm2d(affine=False) to pools) and
  the bare pool when not (NAS-Bench-201: its POOLING op has no BN).
- every other op (the conv branches, and skip_connect at stride 2, a FactorizedReduce with parameters): the
  affine-free batch norm of its pre-BN output ``conv_outs[name]``, computed outside by the op's body applied to
  ``edge_relu(x)`` (one ReLU per edge, shared by all branches).

Batch norm is BatchNorm2d(affine=False) in training mode: batch statistics over (N, H, W), biased variance,
``eps``; no running statistics. All branches have the output size (N, C, ceil(H/stride), ceil(W/stride)).
Half inputs (float16, bfloat16) are computed as autocast runs DARTS' own ops: pools and batch norms in their
input's dtype (PyTorch's batch norm accumulates its statistics in float32), so nothing is kept for backward in an
upcast copy, and the weighted sum in float32 (the weights are float32); the result is returned in the dtype of
``x``. (The fused kernels do all their arithmetic in float32; both agree within half-precision rounding.)
Nothing here knows a search space: op names not in the list above are conv branches.

Every variant takes the same arguments, ``(x, weights, conv_outs, ops, stride, *, pool_bn, index, k, eps)``, as
``ktnas.kernels.mixed_op`` passes them (and the fused kernels' functions in ``triton_mixed.py`` take them too); a
variant ignores the keywords it has no use for (``index`` outside GDAS, ``k`` outside PC-DARTS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FREE_OPS = ("none", "skip_connect", "avg_pool_3x3", "max_pool_3x3")  # computed from x (skip: at stride 1)


def edge_relu(x: torch.Tensor) -> torch.Tensor:
    """The ReLU every conv branch of an edge starts with; compute it once and feed it to all conv bodies."""
    return F.relu(x)


def is_conv_branch(name: str, stride: int) -> bool:
    """Whether ``name`` at ``stride`` comes in through ``conv_outs`` rather than being computed from x."""
    return name not in FREE_OPS or (name == "skip_connect" and stride != 1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _bn(y: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free batch norm with batch statistics (biased variance): one ``F.batch_norm`` call, as DARTS'
    ``BatchNorm2d(affine=False)`` runs it (one ``native_batch_norm`` forward and one backward kernel, not the
    dozen elementwise and reduction ops of writing it out), in any dtype, float64 included."""
    return F.batch_norm(y, None, None, training=True, momentum=0.0, eps=eps)


def check_args(x, weights, ops, stride) -> None:
    """The checks every implementation makes of an edge's input, stride and weights (ValueError)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    if weights.dim() != 1 or weights.shape[0] != len(ops):
        raise ValueError(f"weights must be [{len(ops)}] (one per op in {tuple(ops)}), got {tuple(weights.shape)}")


def _branch(name, x, conv_outs, stride, eps, pool_bn, shape):
    """op ``name`` applied to x, its BN included, in the dtype of its input; None for 'none'."""
    if name == "none":
        return None
    if name == "skip_connect" and stride == 1:
        return x
    if name in ("avg_pool_3x3", "max_pool_3x3"):
        y = (F.avg_pool2d(x, 3, stride, 1, count_include_pad=False) if name == "avg_pool_3x3"
             else F.max_pool2d(x, 3, stride, 1))
        return _bn(y, eps) if pool_bn else y
    if name not in conv_outs:
        raise ValueError(f"conv_outs lacks the pre-BN output of conv branch {name!r} (stride {stride})")
    y = conv_outs[name]
    if tuple(y.shape) != shape:
        raise ValueError(f"conv_outs[{name!r}] has shape {tuple(y.shape)}, expected {shape}")
    return _bn(y, eps)


def check_index(index, ops) -> int:
    """GDAS' sampled op ``index`` as an int in range(len(ops)) (ValueError otherwise)."""
    if index is None:
        raise ValueError("variant 'gdas' needs the sampled op's index")
    index = int(index)
    if not 0 <= index < len(ops):
        raise ValueError(f"index {index} out of range for {len(ops)} ops")
    return index


def check_k(channels: int, k: int) -> None:
    """PC-DARTS' partial-channel factor ``k`` divides the edge's ``channels`` (ValueError otherwise)."""
    if k < 1 or channels % k:
        raise ValueError(f"channels ({channels}) must be divisible by the partial-channel factor k ({k})")


def out_shape(x, stride) -> tuple:
    """(N, C, ceil(H/stride), ceil(W/stride)): the shape of every branch's output."""
    N, C, H, W = x.shape
    return (N, C, -(-H // stride), -(-W // stride))


def mixed_op_reference(x: torch.Tensor, weights: torch.Tensor, conv_outs: dict, ops, stride: int, *,
                       pool_bn: bool = True, index: int | None = None, k: int = 4, eps: float = 1e-5) -> torch.Tensor:
    """``sum_k weights[k] * op_k(x)`` (see the module docstring); [N, C, ceil(H/stride), ceil(W/stride)].

    x: [N, C, H, W] edge input. weights: [len(ops)] (softmax(alpha) for DARTS). conv_outs: {op name: pre-BN
    output} for every conv branch in ``ops`` (skip_connect too at stride 2). pool_bn: BN after pools (DARTS True,
    NAS-Bench-201 False). ``index`` and ``k`` are not used.
    """
    check_args(x, weights, ops, stride)
    dt, shape = _compute_dtype(x), out_shape(x, stride)
    w = weights.to(dt).unbind(0)  # one unbind (one stack in backward), not a select per op
    out = None
    for k, name in enumerate(ops):
        y = _branch(name, x, conv_outs, stride, eps, pool_bn, shape)
        if y is not None:
            out = w[k] * y if out is None else out + w[k] * y
    if out is None:  # only 'none': zeros, still connected to the weights (zero gradient)
        out = sum(w) * x.new_zeros(shape, dtype=dt)
    return out.to(x.dtype)


def mixed_op_reference_gdas(x: torch.Tensor, weights: torch.Tensor, conv_outs: dict, ops, stride: int, *,
                            pool_bn: bool = True, index: int | None = None, k: int = 4,
                            eps: float = 1e-5) -> torch.Tensor:
    """GDAS: only op ``index`` is computed; ``weights[index] * op_index(x)``.

    ``weights`` is the hard straight-through Gumbel-softmax vector (``one_hot - p.detach() + p``), so the gradient
    reaches every logit through ``weights[index]``. conv_outs needs only the sampled op's entry (if a conv branch).
    AutoDL's GDAS also adds the other (numerically zero) entries of ``weights`` as scalars; that is left out here.
    ``index`` is required; ``k`` is not used.
    """
    check_args(x, weights, ops, stride)
    index = check_index(index, ops)
    dt, shape = _compute_dtype(x), out_shape(x, stride)
    y = _branch(ops[index], x, conv_outs, stride, eps, pool_bn, shape)
    if y is None:
        y = x.new_zeros(shape, dtype=dt)
    return (weights[index].to(dt) * y).to(x.dtype)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """PC-DARTS' channel shuffle: [N, g*c, H, W] viewed as [N, g, c, H, W], transposed to [N, c, g, H, W]."""
    N, C, H, W = x.shape
    return x.view(N, groups, C // groups, H, W).transpose(1, 2).reshape(N, C, H, W)


def mixed_op_reference_pc(x: torch.Tensor, weights: torch.Tensor, conv_outs: dict, ops, stride: int, *,
                          pool_bn: bool = True, index: int | None = None, k: int = 4,
                          eps: float = 1e-5) -> torch.Tensor:
    """PC-DARTS partial channels: the first C/k channels go through the mixed op (conv_outs built for C/k
    channels, from ``edge_relu(x[:, :C//k])``), the rest bypass it (identity at stride 1; 2x2 max pool at stride
    2, ceil_mode so odd sizes give ceil(H/2) like the mixed op); both are concatenated and channel-shuffled with
    ``k`` groups. ``index`` is not used."""
    C = x.shape[1]
    check_k(C, k)
    c = C // k
    head = mixed_op_reference(x[:, :c], weights, conv_outs, ops, stride, pool_bn=pool_bn, eps=eps)
    rest = x[:, c:]
    if stride == 2:
        rest = F.max_pool2d(rest, 2, 2, ceil_mode=True)
    return channel_shuffle(torch.cat([head, rest], dim=1), k)
