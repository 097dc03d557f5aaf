"""The supernet: a stem, then searched cells whose every edge is one ``ktnas.kernels.mixed_op`` call.

Two stems, one network code:

- ``stem='cached'`` (KT-NAS): the input is a frozen pretrained stem's cached features [C_f, H, W]; a trainable
  adapter (1x1 conv + BN) brings them to ``stem_multiplier * C`` channels, the width DARTS' conv stem gives its
  first cells (DARTS: 3C; NB201: C).
- ``stem='conv'`` (the classic baseline, ``--stem none``): DARTS' / NAS-Bench-201's own stem, a 3x3 conv to
  ``stem_multiplier * C`` channels + BN, on raw images.

The cells come from the search space's module (``ktnas.engine.spaces``); the layout (cells built, their width,
the reductions) from the one layout rule, ``ktnas.engine.layout.resolve_layout``.

Architecture weights are registered parameters (``alpha_normal``/``alpha_reduce`` or ``alpha_cell``, PC-DARTS'
edge-normalisation ``beta_*``), so they live in the state dict; ``arch_parameters`` and ``weight_parameters``
split the parameters into two disjoint, complete groups. Every BatchNorm uses batch statistics in training and
evaluation alike (no running statistics, as NAS-Bench-201's search with ``track_running_stats=False``): the mixed
op's BN has none, and this keeps evaluation consistent with it and the state free of hidden buffers.
"""
from __future__ import annotations

import contextlib
import os
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

from ktnas.cache.errors import KtnasError
from ktnas.kernels import edge_relu, mixed_op, resolve_impl
from ktnas.kernels.errors import KernelError

from ktnas.engine.layout import Layout
from ktnas.engine.ops import conv_body, has_params
from ktnas.engine.spaces import SearchSpace, get_space

RECOMPUTE = ("none", "edge", "cell")


def recomputed(module: nn.Module) -> nn.Module:
    """Make ``module`` keep only its inputs for backward and run its forward again there (activation
    checkpointing, ``torch.utils.checkpoint`` with ``use_reentrant=False``): the same values and gradients, its
    intermediate tensors freed after the forward. Nothing inside draws random numbers (the supernet's BNs keep no
    running statistics), so the RNG state is not stashed -- which also keeps it capturable in a CUDA graph. The
    wrapper is a method bound to ``module``, so a deep copy of the network recomputes with its own weights."""
    module.forward = types.MethodType(_checkpointed_forward, module)
    return module


def _checkpointed_forward(module: nn.Module, *args, **kwargs):
    forward = type(module).forward.__get__(module)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    modes = _get_current_function_mode_stack()  # e.g. a cast policy: the recomputation must cast alike
    extra = dict(context_fn=lambda: (contextlib.nullcontext(), _entered(modes))) if modes else {}  # (torch.compile
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **extra, **kwargs)  # takes none)


@contextlib.contextmanager
def _entered(modes):
    """The torch-function modes that were active at a checkpointed forward, active again for its recomputation
    (autograd runs backward without them; autocast itself checkpoint restores)."""
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        yield


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
            return mixed_op(x, weights, outs, self.ops, self.stride, pool_bn=self.pool_bn, variant="gdas", index=index,
                            impl=self.impl)
        xk = x[:, :x.shape[1] // self.k] if self.k > 1 else x
        if self.per_op_relu:
            outs = {name: body(edge_relu(xk)) for name, body in self.bodies.items()}
        else:
            xr = edge_relu(xk)
            outs = {name: body(xr) for name, body in self.bodies.items()}
        variant = "pc" if self.k > 1 else "full"
        y = mixed_op(x, weights, outs, self.ops, self.stride, pool_bn=self.pool_bn, variant=variant, k=self.k,
                     impl=self.impl)
        if self.per_op_relu and self.none is not None:  # DARTS' Zero op: x.mul(0.), weighted and summed
            y = y + weights[self.none] * x[:, :, ::self.stride, ::self.stride].mul(0.0)
        return y


class Supernet(nn.Module):
    """The search network (see the module docstring).

    space: 'darts' | 'nb201'. in_channels: stem input channels (cached features' C_f, or 3 for images).
    stem: 'cached' (1x1 conv + BN adapter) | 'conv' (3x3 conv + BN). layers/channels/reductions: the layout.
    k: partial-channel factor (1 = all channels; PC-DARTS 4). edge_norm: PC-DARTS' edge normalisation betas.
    kernels: the mixed-op implementation ('auto' | 'torch' | 'triton'). recompute: what backward recomputes
    instead of keeping ('none'; 'edge': each mixed edge keeps its input only; 'cell': each cell keeps its inputs).
    """

    def __init__(self, space: str, num_classes: int, in_channels: int, *, stem: str = "cached", layers: int = 5,
                 channels: int = 32, reductions=(2,), k: int = 1, edge_norm: bool = False, kernels: str = "auto",
                 recompute: str = "none"):
        super().__init__()
        self.space = get_space(space)
        if stem not in ("cached", "conv"):
            raise KtnasError(f"unknown stem {stem!r}: use 'cached' or 'conv'")
        if kernels != "auto" or os.environ.get("KTNAS_KERNELS", "").strip():
            try:  # refuse kernels that cannot run here now, not at the first step
                resolve_impl(kernels)
            except KernelError as e:
                raise KtnasError(str(e)) from None
        layout = Layout(int(layers), int(channels), tuple(sorted(set(int(r) for r in reductions))))
        if layout.layers < 1 or layout.channels < 1 or any(not 0 <= r < layout.layers for r in layout.reductions):
            raise KtnasError(f"bad layout: layers={layout.layers}, channels={layout.channels}, reductions="
                             f"{list(layout.reductions)}: pass layers >= 1, channels >= 1 and reduction positions "
                             f"in 0..{layout.layers - 1}")
        if recompute not in RECOMPUTE:
            raise KtnasError(f"unknown --recompute {recompute!r}: use one of {', '.join(RECOMPUTE)}")
        self.layout = dict(layout.as_dict(), stem=stem, k=k)
        C_stem = self.space.stem_multiplier * channels
        conv = (nn.Conv2d(in_channels, C_stem, 1, bias=False) if stem == "cached"
                else nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False))
        self.stem = nn.Sequential(conv, nn.BatchNorm2d(C_stem))
        classic = stem == "conv"  # the baseline's edges compute as the authors' MixedOp (see MixedEdge)
        edge = lambda C, stride: MixedEdge(C, stride, self.space, k, kernels, classic)  # kernels resolved per call
        self.cells, self.head, C_p = self.space.search_cells(C_stem, layout, edge)
        if recompute == "cell":
            units = list(self.cells)
        else:
            units = [m for m in self.cells.modules() if isinstance(m, MixedEdge)] if recompute == "edge" else []
        for m in units:
            recomputed(m)
        self.cell_types = self.space.cell_types  # DARTS' alpha_reduce exists (unused) without reductions too
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
        beta = getattr(self, f"beta_{t}")
        return torch.cat([F.softmax(b, dim=-1) for b in beta.split(self.space.node_edges())])

    def default_arch(self) -> dict:
        """{cell type: (softmax(alpha), None)}: the continuous relaxation."""
        return {t: (F.softmax(a, dim=-1), None) for t, a in self.alphas().items()}

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, arch: dict | None = None) -> torch.Tensor:
        """Logits. ``arch``: {cell type: (weights [E, K], index [E] or None)}; index given = one op per edge
        (GDAS, random search). Default: softmax of the alphas, every op (or partial channels when k > 1)."""
        arch = arch or self.default_arch()
        out = self.space.forward_cells(self.cells, self.stem(x), arch, self.edge_weights)
        return self.classifier(F.adaptive_avg_pool2d(self.head(out), 1).flatten(1))


def count_parameters(model: nn.Module, arch: bool = False) -> int:
    """Number of weight parameters (architecture parameters too with ``arch``), as DARTS' count_parameters."""
    params = model.parameters() if arch else model.weight_parameters()
    return sum(p.numel() for p in params)
