"""Candidate operations of the DARTS and NAS-Bench-201 spaces: ``OPS[name](C, stride, affine) -> nn.Module``.

As in DARTS' ``operations.py``, pools are bare here; the DARTS search cell follows them with an affine-free BN
(``SearchSpace.pool_bn``), NAS-Bench-201's does not (its ``POOLING`` is the bare pool; the 1x1 ReLUConvBN it puts
in front only when C_in != C_out is never needed, every op here maps C channels to C). skip_connect at stride 2
is a FactorizedReduce (both spaces). Every 3x3 pool and conv pads so that the output is ceil(H / stride).

Every parametric op is ReLU -> body -> BatchNorm. The fused mixed op (``ktnas.kernels``) takes them apart: the
ReLU is computed once per edge (``edge_relu``), each op's body (``conv_body``) gives its pre-BN output, and the
mixed op applies the affine-free BN itself, so that ``OPS[name](x) == BN(conv_body(name)(edge_relu(x)))``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ktnas.cache.errors import KtnasError
from ktnas.kernels.reference import is_conv_branch


class Zero(nn.Module):
    """The 'none' op: zeros of the output shape (subsampled at stride 2), as DARTS' Zero."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, ::self.stride, ::self.stride].mul(0.0)


class _ReLUBodyBN(nn.Module):
    """ReLU -> ``body`` -> BatchNorm2d(C_out): the shape of every parametric op."""

    def __init__(self, body: nn.Module, C_out: int, affine: bool):
        super().__init__()
        self.body = body
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        return self.bn(self.body(F.relu(x)))


class ReLUConvBN(_ReLUBodyBN):
    """ReLU, conv, BN (DARTS' ReLUConvBN; NB201's nor_conv_kxk)."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation=1, affine=True):
        super().__init__(nn.Conv2d(C_in, C_out, kernel_size, stride, padding, dilation, bias=False), C_out, affine)


class DilConv(_ReLUBodyBN):
    """ReLU, dilated depthwise conv, pointwise conv, BN."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__(nn.Sequential(
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False)), C_out, affine)


class SepConv(_ReLUBodyBN):
    """Two stacked depthwise-separable blocks (the first strided), as DARTS' SepConv."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__(nn.Sequential(
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(),
            nn.Conv2d(C_in, C_in, kernel_size, 1, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False)), C_out, affine)


class _FactorizedConcat(nn.Module):
    """Two stride-2 1x1 convs, the second on the input shifted by one pixel, concatenated along channels.

    The shift pads one zero row/column at the bottom/right first (as NAS-Bench-201), so odd sizes give
    ceil(H / 2) from both halves; for even sizes this equals DARTS' ``x[:, :, 1:, 1:]``. An odd C_out gives the
    first conv the extra channel.
    """

    def __init__(self, C_in, C_out):
        super().__init__()
        self.conv_1 = nn.Conv2d(C_in, C_out - C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)

    def forward(self, x):
        return torch.cat([self.conv_1(x), self.conv_2(F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:])], dim=1)


class FactorizedReduce(_ReLUBodyBN):
    """skip_connect at stride 2: ReLU, two offset stride-2 1x1 convs, BN."""

    def __init__(self, C_in, C_out, affine=True):
        super().__init__(_FactorizedConcat(C_in, C_out), C_out, affine)


OPS = {
    "none": lambda C, stride, affine: Zero(stride),
    "skip_connect": lambda C, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
    "nor_conv_1x1": lambda C, stride, affine: ReLUConvBN(C, C, 1, stride, 0, 1, affine),
    "nor_conv_3x3": lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, 1, affine),
}


def has_params(name: str, stride: int) -> bool:
    """Whether op ``name`` at ``stride`` is a conv branch (has a body) rather than parameter-free."""
    if name not in OPS:
        raise KtnasError(f"unknown op {name!r}; valid ops: {', '.join(OPS)}")
    return is_conv_branch(name, stride)


def conv_body(name: str, C: int, stride: int) -> nn.Module:
    """The search-time (affine-free) op ``name`` without its leading ReLU and final BN: input edge_relu(x),
    output the pre-BN tensor [N, C, ceil(H/stride), ceil(W/stride)]."""
    if not has_params(name, stride):
        raise KtnasError(f"op {name!r} at stride {stride} is parameter-free and has no conv body; the mixed op "
                         f"computes it from x")
    return OPS[name](C, stride, False).body


class AuxPool(nn.Module):
    """The auxiliary head's pooling to 2x2: DARTS' own (``AvgPool2d(5, stride=3, padding=0,
    count_include_pad=False)``) where it gives 2x2, on the 8x8 (to 10x10) maps of DARTS' networks and of ktnas's
    on 16x16 features; an adaptive 2x2 average elsewhere, so any feature size trains."""

    def forward(self, x):
        if all(8 <= n <= 10 for n in x.shape[-2:]):
            return F.avg_pool2d(x, 5, stride=3, padding=0, count_include_pad=False)
        return F.adaptive_avg_pool2d(x, 2)


class AuxiliaryHead(nn.Module):
    """DARTS' auxiliary head (AuxiliaryHeadCIFAR): ReLU, pool to 2x2, 1x1 conv to 128, BN, ReLU, 2x2 conv to 768,
    BN, ReLU, linear."""

    def __init__(self, C, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(), AuxPool(), nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU())
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
