"""The supernet: a stem, then searched cells whose every edge is one ``ktnas.kernels.mixed_op`` call.

Two stems, one network code:

- ``stem='cached'`` (KT-NAS): the input is a frozen pretrained stem's cached features [C_f, H, W]; a trainable
  adapter (1x1 conv + BN) brings them to ``stem_multiplier * C`` channels, the width DARTS' conv stem gives its
  first cells (DARTS: 3C; NB201: C).
- ``stem='conv'`` (the classic baseline, ``--stem none``): DARTS' / NAS-Bench-201's own stem, a 3x3 conv to
  ``stem_multiplier * C`` channels + BN, on raw images.

DARTS (``model_search.py``'s ``Network``): ``layers`` cells; the cells at ``reductions`` halve the resolution and
double the channels; a cell takes the two previous cells' outputs (preprocessed by a 1x1 ReLUConvBN, or a
FactorizedReduce after a reduction), has 4 intermediate nodes (14 edges) and concatenates them (multiplier 4);
global average pooling and a linear classifier follow.

NAS-Bench-201 (AutoDL's ``TinyNetworkDarts``/``TinyNetworkGDAS``): ``layers`` positions; at ``reductions`` a
ResNet basic block (stride 2, channels doubled), elsewhere a search cell (3 nodes, 6 edges) whose output is its
last node; BN + ReLU, global pooling and a linear classifier.

``kt_layout`` gives the default layout for a cached stem: the classic network (on 32 px inputs: DARTS 8 cells, C=16,
reductions at 2 and 5; NB201 17 positions, C=16, reductions at 5 and 11) minus the cells that run at a resolution
higher than the stem's output, and the reduction that follows them. A 16x16 stem output (e.g. 32 px through
``mobilenet_v2:features.1``, 64 px through ``features.3``) thus keeps DARTS' cells 3..7: 5 cells at C=32 on 16x16,
the reduction at position 2 (-> 64 channels, 8x8). 32x32 or larger keeps the whole classic network; 8x8 keeps
the last stage only (DARTS: 2 cells at C=64, no reduction).

Architecture weights are registered parameters (``alpha_normal``/``alpha_reduce`` or ``alpha_cell``, PC-DARTS'
edge-normalisation ``beta_*``), so they live in the state dict; ``arch_parameters`` and ``weight_parameters``
split the parameters into two disjoint, complete groups. Every BatchNorm uses batch statistics in training and
evaluation alike (no running statistics, as NAS-Bench-201's search with ``track_running_stats=False``): the mixed
op's BN has none, and this keeps evaluation consistent with it and the state free of hidden buffers.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ktnas.cache.errors import KtnasError
from ktnas.kernels import edge_relu, mixed_op, resolve_impl

from .ops import FactorizedReduce, ReLUConvBN, conv_body, has_params
from .spaces import SearchSpace, get_space

STEM_MULTIPLIER = {"darts": 3, "nb201": 1}


def classic_layout(space: str) -> tuple[int, int, tuple[int, ...]]:
    """(layers, channels, reductions) of the classic search network: DARTS 8 cells, C=16, reductions at
    layers//3 and 2*layers//3; NB201 3 stages of 5 cells, C=16, a ResNet block between stages."""
    return (8, 16, (2, 5)) if space == "darts" else (17, 16, (5, 11))


def default_reductions(space: str, layers: int) -> tuple[int, ...]:
    """DARTS' rule for a given depth (layers//3, 2*layers//3); NB201: two blocks splitting 3 equal stages."""
    if space == "darts":
        return tuple(sorted({layers // 3, 2 * layers // 3}))
    n = (layers - 2) // 3
    return (n, 2 * n + 1) if n >= 1 else ()


def kt_layout(space: str, resolution: int, image_size: int = 32) -> tuple[int, int, tuple[int, ...]]:
    """The KT-NAS default (layers, channels, reductions) for a cached stem whose output is ``resolution`` px:
    the classic network on ``image_size`` inputs without the cells that run above that resolution (see the
    module docstring)."""
    layers, C, reds = classic_layout(space)
    start, res = 0, image_size
    for r in reds:  # drop each stage (and the reduction ending it) that runs above the stem's resolution
        if resolution >= res:
            break
        start, res, C = r + 1, res // 2, C * 2
    return layers - start, C, tuple(r - start for r in reds if r >= start)


def _no_running_stats(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


class MixedEdge(nn.Module):
    """One edge: the conv bodies of its parametric ops; the rest (and every BN) happens in ``mixed_op``.

    ``k`` > 1 builds the bodies for ``C // k`` channels (PC-DARTS); ``body_calls`` counts conv body evaluations
    (a test hook for GDAS' one-op forward). ``per_op_relu`` (the classic baseline): computed as DARTS' and
    NAS-Bench-201's own ``MixedOp`` computes it, every conv op on its own ReLU of x and 'none' a zero tensor times
    its weight (same values; the memory and launches of the authors' code, so that ratios against the baseline
    are not inflated); else one ReLU per edge shared by the conv bodies, and 'none' costs nothing.
    """

    def __init__(self, C: int, stride: int, space: SearchSpace, k: int = 1, impl: str = "torch",
                 per_op_relu: bool = False):
        super().__init__()
        self.per_op_relu = per_op_relu
        self.none = space.ops.index("none") if "none" in space.ops else None
        if C % k:
            raise KtnasError(f"cell width {C} is not divisible by the partial-channel factor {k}: pass --channels "
                             f"a multiple of {k}")
        self.ops, self.stride, self.pool_bn, self.k, self.impl = space.ops, stride, space.pool_bn, k, impl
        self.bodies = nn.ModuleDict({op: conv_body(op, C // k, stride) for op in space.ops if has_params(op, stride)})

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """``weights`` [K]; ``index`` not None: GDAS (only that op is computed); else full or partial channels."""
        if index is not None:
            name = self.ops[index]
            outs = {name: self.bodies[name](edge_relu(x))} if name in self.bodies else {}
            return mixed_op(x, weights, outs, self.ops, self.stride, self.pool_bn, variant="gdas", index=index,
                            impl=self.impl)
        xk = x[:, :x.shape[1] // self.k] if self.k > 1 else x
        if self.per_op_relu:
            outs = {name: body(edge_relu(xk)) for name, body in self.bodies.items()}
        else:
            xr = edge_relu(xk)
            outs = {name: body(xr) for name, body in self.bodies.items()}
        variant = "pc" if self.k > 1 else "full"
        y = mixed_op(x, weights, outs, self.ops, self.stride, self.pool_bn, variant=variant, k=self.k, impl=self.impl)
        if self.per_op_relu and self.none is not None:  # DARTS' Zero op: x.mul(0.), weighted and summed
            y = y + weights[self.none] * x[:, :, ::self.stride, ::self.stride].mul(0.0)
        return y


class DartsCell(nn.Module):
    """DARTS' search cell: preprocess both inputs, 4 nodes each summing its mixed edges, concat the nodes."""

    def __init__(self, space, C_pp, C_p, C, reduction, reduction_prev, k=1, impl="torch", per_op_relu=False):
        super().__init__()
        self.reduction, self.steps = reduction, space.steps
        self.pre0 = FactorizedReduce(C_pp, C, affine=False) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0,
                                                                                              affine=False)
        self.pre1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(MixedEdge(C, 2 if reduction and j < 2 else 1, space, k, impl, per_op_relu)
                                   for i in range(space.steps) for j in range(2 + i))
        self.out_channels = space.steps * C

    def forward(self, s0, s1, weights, index=None, edge_w=None):
        states, e = [self.pre0(s0), self.pre1(s1)], 0
        for _ in range(self.steps):
            s = 0
            for h in states:
                y = self.edges[e](h, weights[e], None if index is None else int(index[e]))
                s = s + (y if edge_w is None else edge_w[e] * y)
                e += 1
            states.append(s)
        return torch.cat(states[2:], dim=1)


class NB201Cell(nn.Module):
    """NAS-Bench-201's search cell: node j sums its mixed edges from nodes 0..j-1; the output is the last node."""

    def __init__(self, space, C, k=1, impl="torch", per_op_relu=False):
        super().__init__()
        self.pairs = space.edge_list()
        self.edges = nn.ModuleList(MixedEdge(C, 1, space, k, impl, per_op_relu) for _ in self.pairs)
        self.reduction, self.out_channels = False, C

    def forward(self, x, weights, index=None, edge_w=None):
        nodes = [x]
        for e, (j, i) in enumerate(self.pairs):
            if len(nodes) <= j:
                nodes.append(0)
            y = self.edges[e](nodes[i], weights[e], None if index is None else int(index[e]))
            nodes[j] = nodes[j] + (y if edge_w is None else edge_w[e] * y)
        return nodes[-1]


class ResNetBasicBlock(nn.Module):
    """NAS-Bench-201's reduction: two 3x3 ReLUConvBN (the first strided) plus an avg-pool + 1x1 conv shortcut."""

    def __init__(self, C_in, C_out):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, 2, 1, affine=True)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, affine=True)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True), nn.Conv2d(C_in, C_out, 1, bias=False))
        self.reduction, self.out_channels = True, C_out

    def forward(self, x):
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class Supernet(nn.Module):
    """The search network (see the module docstring).

    space: 'darts' | 'nb201'. in_channels: stem input channels (cached features' C_f, or 3 for images).
    stem: 'cached' (1x1 conv + BN adapter) | 'conv' (3x3 conv + BN). layers/channels/reductions: the layout.
    k: partial-channel factor (1 = all channels; PC-DARTS 4). edge_norm: PC-DARTS' edge normalisation betas.
    kernels: the mixed-op implementation ('auto' | 'torch' | 'triton').
    """

    def __init__(self, space: str, num_classes: int, in_channels: int, *, stem: str = "cached", layers: int = 5,
                 channels: int = 32, reductions=(2,), k: int = 1, edge_norm: bool = False, kernels: str = "auto"):
        super().__init__()
        self.space = get_space(space)
        reductions = tuple(sorted(set(int(r) for r in reductions)))
        if layers < 1 or channels < 1 or any(not 0 <= r < layers for r in reductions):
            raise KtnasError(f"bad layout: layers={layers}, channels={channels}, reductions={list(reductions)}: "
                             f"pass layers >= 1, channels >= 1 and reduction positions in 0..{layers - 1}")
        if self.space.name == "nb201" and len(reductions) == layers:
            raise KtnasError("an nb201 supernet needs at least one search cell: pass fewer --reductions")
        if stem not in ("cached", "conv"):
            raise KtnasError(f"unknown stem {stem!r}: use 'cached' or 'conv'")
        if kernels != "auto" or os.environ.get("KTNAS_KERNELS", "").strip():
            resolve_impl(kernels)  # refuse kernels that cannot run here now, not at the first step
        impl = kernels  # resolved per call, on the tensors' device and dtype
        classic = stem == "conv"  # the baseline's edges compute as the authors' MixedOp (see MixedEdge)
        self.layout = dict(layers=layers, channels=channels, reductions=list(reductions), stem=stem, k=k)
        C_stem = STEM_MULTIPLIER[self.space.name] * channels
        conv = (nn.Conv2d(in_channels, C_stem, 1, bias=False) if stem == "cached"
                else nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False))
        self.stem = nn.Sequential(conv, nn.BatchNorm2d(C_stem))
        self.cells = nn.ModuleList()
        C = channels
        if self.space.name == "darts":
            C_pp, C_p, red_prev = C_stem, C_stem, False
            for i in range(layers):
                red = i in reductions
                C = C * 2 if red else C
                cell = DartsCell(self.space, C_pp, C_p, C, red, red_prev, k, impl, classic)
                self.cells.append(cell)
                C_pp, C_p, red_prev = C_p, cell.out_channels, red
            self.head = nn.Identity()
            self.cell_types = ("normal", "reduce")  # alpha_reduce exists (unused) without reductions too
        else:
            C_p = C_stem
            for i in range(layers):
                if i in reductions:
                    C = C * 2
                    self.cells.append(ResNetBasicBlock(C_p, C))
                else:
                    self.cells.append(NB201Cell(self.space, C, k, impl, classic))
                C_p = C
            self.head = nn.Sequential(nn.BatchNorm2d(C_p), nn.ReLU())
            self.cell_types = ("cell",)
        self.classifier = nn.Linear(C_p, num_classes)
        E, K = self.space.edges, len(self.space.ops)
        for t in self.cell_types:
            self.register_parameter(f"alpha_{t}", nn.Parameter(1e-3 * torch.randn(E, K)))
            if edge_norm:
                self.register_parameter(f"beta_{t}", nn.Parameter(1e-3 * torch.randn(E)))
        self.edge_norm = edge_norm
        _no_running_stats(self)

    # ------------------------------------------------------------------------------------------- parameters
    def alphas(self) -> dict[str, nn.Parameter]:
        """The architecture weights per cell type ('normal', 'reduce' or 'cell'), [edges, ops]."""
        return {t: getattr(self, f"alpha_{t}") for t in self.cell_types}

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith(("alpha_", "beta_"))]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(("alpha_", "beta_"))]

    def edge_weights(self, t: str) -> torch.Tensor | None:
        """PC-DARTS' edge normalisation: per node, softmax of the betas of its incoming edges (None without)."""
        if not self.edge_norm:
            return None
        beta, out, e = getattr(self, f"beta_{t}"), [], 0
        for n in range(self.space.steps):
            m = 2 + n if self.space.name == "darts" else n + 1
            out.append(F.softmax(beta[e:e + m], dim=-1))
            e += m
        return torch.cat(out)

    def default_arch(self) -> dict:
        """{cell type: (softmax(alpha), None)}: the continuous relaxation."""
        return {t: (F.softmax(a, dim=-1), None) for t, a in self.alphas().items()}

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, arch: dict | None = None) -> torch.Tensor:
        """Logits. ``arch``: {cell type: (weights [E, K], index [E] or None)}; index given = one op per edge
        (GDAS, random search). Default: softmax of the alphas, every op (or partial channels when k > 1)."""
        arch = arch or self.default_arch()
        s = self.stem(x)
        if self.space.name == "darts":
            s0 = s1 = s
            for cell in self.cells:
                t = "reduce" if cell.reduction else "normal"
                w, idx = arch[t]
                s0, s1 = s1, cell(s0, s1, w, idx, self.edge_weights(t))
            out = s1
        else:
            out = s
            for cell in self.cells:
                if isinstance(cell, NB201Cell):
                    w, idx = arch["cell"]
                    out = cell(out, w, idx, self.edge_weights("cell"))
                else:
                    out = cell(out)
            out = self.head(out)
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


def count_parameters(model: nn.Module, arch: bool = False) -> int:
    """Number of weight parameters (architecture parameters too with ``arch``), as DARTS' count_parameters."""
    params = model.parameters() if arch else model.weight_parameters()
    return sum(p.numel() for p in params)
