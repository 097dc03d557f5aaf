"""``mixed_op``: the one call every supernet edge makes. It validates its arguments and dispatches to an
implementation of the kernel contract (``reference.py`` holds the specification).

Implementations: ``'torch'`` (the PyTorch reference, any device, any dtype) and ``'triton'`` (the fused
kernels of ``triton_mixed.py``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; float32, bfloat16,
float16; the ``'full'`` variant so far). ``'auto'`` picks the environment variable ``KTNAS_KERNELS`` when it
is set, else ``'torch'``: Triton becomes the CUDA default once the kernels have been verified on a GPU.

Variants: ``'full'`` (DARTS: ``sum_k w_k op_k(x)``), ``'gdas'`` (only op ``index`` is computed) and ``'pc'``
(PC-DARTS partial channels: the first ``C/k`` channels through the mixed op, the rest bypass, channel shuffle).
"""
from __future__ import annotations

import os

import torch

from ktnas.cache.errors import KtnasError

from .reference import mixed_op_reference, mixed_op_reference_gdas, mixed_op_reference_pc

IMPLS = ("auto", "torch", "triton")
VARIANTS = ("full", "gdas", "pc")


def resolve_impl(impl: str = "auto", device: torch.device | str | None = None) -> str:
    """The implementation ``impl`` means here: 'torch' or 'triton' (refused while the kernels are not built)."""
    if impl == "auto":
        impl = os.environ.get("KTNAS_KERNELS", "").strip() or "torch"
        if impl == "auto":
            impl = "torch"
    if impl not in IMPLS[1:]:
        raise KtnasError(f"unknown kernels {impl!r} (from --kernels or KTNAS_KERNELS): use auto, torch or triton")
    if impl == "triton":
        from . import triton_mixed  # imported late: TRITON_INTERPRET is read when triton is first imported

        if not triton_mixed.available(device):
            raise KtnasError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1 to interpret the kernels "
                             "on the CPU): use --kernels torch")
    return impl


def mixed_op(x: torch.Tensor, weights: torch.Tensor, conv_outs: dict, ops, stride: int, pool_bn: bool, *,
             variant: str = "full", index: int | None = None, k: int = 4, impl: str = "auto",
             eps: float = 1e-5) -> torch.Tensor:
    """One edge's mixed operation (see ``kernels/reference.py`` for the exact semantics).

    x: [N, C, H, W] edge input. weights: [len(ops)]. conv_outs: {op: pre-BN output of its conv body applied to
    ``edge_relu(x)``} (for ``'pc'``: to ``edge_relu(x[:, :C//k])``; for ``'gdas'``: only the sampled op's entry,
    if it is a conv branch). stride: 1 or 2. pool_bn: affine-free BN after pools (DARTS) or not (NB201).
    variant: 'full' | 'gdas' (needs ``index``) | 'pc' (uses ``k``). impl: 'auto' | 'torch' | 'triton'.
    """
    if variant not in VARIANTS:
        raise KtnasError(f"unknown mixed-op variant {variant!r}: use one of {', '.join(VARIANTS)}")
    if variant == "gdas" and index is None:
        raise ValueError("variant 'gdas' needs the sampled op's index")
    if variant == "pc" and (not isinstance(k, int) or k < 1 or x.shape[1] % k):
        raise KtnasError(f"partial-channel factor k={k!r} must be a positive divisor of the edge's {x.shape[1]} "
                         f"channels: pass --channels divisible by k")
    if resolve_impl(impl, x.device) == "triton":
        if variant != "full" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise KtnasError(f"the fused Triton kernels cover the full mixed op in float32/bfloat16/float16 so far, "
                             f"not variant {variant!r} in {x.dtype}: use --kernels torch")
        from .triton_mixed import mixed_op_triton

        return mixed_op_triton(x, weights, conv_outs, ops, stride, eps, pool_bn=pool_bn)
    if variant == "gdas":
        return mixed_op_reference_gdas(x, weights, index, conv_outs, ops, stride, eps, pool_bn=pool_bn)
    if variant == "pc":
        return mixed_op_reference_pc(x, weights, conv_outs, ops, stride, k, eps, pool_bn=pool_bn)
    return mixed_op_reference(x, weights, conv_outs, ops, stride, eps, pool_bn=pool_bn)
