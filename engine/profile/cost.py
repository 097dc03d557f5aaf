"""What a model costs to run, exactly: its weights and the multiply-adds of one image (convolutions and linear
layers, ``torch.utils.flop_counter``'s FLOPs halved, the convention of DARTS', AutoDL's and the NAS papers' "FLOPs"),
the frozen stem's share apart; the auxiliary head (training only) is left out.

:func:`count` counts a built module on one input; :func:`genotype_cost` builds a genotype's evaluation network on
the meta device (no memory, no data) and counts it; :class:`CostModel` is the same cost as a sum over the cells'
edges, ``fixed + Σ_cells Σ_edges cost(edge, op)``, read once per layout from a few probe networks, so a search
can weigh every op of every edge (its expected cost under the architecture weights) and a derivation can keep
within a budget without building anything. It is exact: equal to the built network's count for every genotype
(tested), since the ops of a cell are separate modules whose costs add."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ktnas.cache.errors import KtnasError

AUX = "auxiliary_head"
_TABLES: dict = {}  # (space, layout) -> (table, fixed)


@dataclass(frozen=True)
class Cost:
    """Weights and multiply-adds per image of a model; ``stem_*`` the frozen stem's share (0 without one)."""
    params: int
    macs: int
    stem_params: int = 0
    stem_macs: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, int, int, int]:
        return self.params, self.macs, self.stem_params, self.stem_macs

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        stem = f" (frozen stem {self.stem_params / 1e6:.3f} M)" if self.stem_params else ""
        stem_m = f" (frozen stem {self.stem_macs / 1e6:.1f} M)" if self.stem_macs else ""
        return f"{self.params / 1e6:.3f} M weights{stem}, {self.macs / 1e6:.1f} M multiply-adds per image{stem_m}"


def _module_counts(net: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], dict[str, int]]:
    """Weights and multiply-adds of every submodule (by its path; '' the whole) for one forward of ``x``."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net(x)
    finally:
        net.train(was)
    macs = {}
    for path, counts in fc.get_flop_counts().items():
        if path != "Global":
            macs[path.partition(".")[2]] = sum(counts.values()) // 2
    params = {path: sum(p.numel() for p in m.parameters()) for path, m in net.named_modules()}
    return params, macs


def count(net: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(weights, multiply-adds) of ``net`` on the input ``x`` (batch 1), the auxiliary head excluded."""
    params, macs = _module_counts(net, x)
    aux = params.get(AUX, 0)
    return params[""] - aux, macs.get("", 0) // x.shape[0]


def model_cost(model) -> Cost:
    """The cost of an exported model (``load_model``'s ``KtnasModel``) on one raw image at its stem's size."""
    size = model.stem.preprocessing.image_size
    image = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
    sp, sm = count(model.stem, image)
    with torch.no_grad():
        feats = model.stem(image)
    np_, nm = count(model.net, feats)
    return Cost(sp + np_, sm + nm, sp, sm)


def meta_network(space, genotype, build: dict) -> nn.Module:
    """``genotype``'s evaluation network built with ``build`` on the meta device (shapes only, no memory)."""
    from ktnas.engine.train.network import build_network

    with torch.device("meta"):
        return build_network(genotype, **build)


def network_input(build: dict, batch: int = 1, device="meta") -> torch.Tensor:
    """An input of the network ``build`` describes: cached features [batch, C, H, H], or 32 px images."""
    c, s = build.get("in_channels"), build.get("in_size")
    return torch.zeros(batch, c or 3, s or 32, s or 32, device=device)


def genotype_cost(genotype, build: dict, stem: Cost | None = None) -> Cost:
    """The cost of ``genotype``'s evaluation network built with ``build`` (``build_network``'s keyword arguments:
    num_classes, layers, channels, reductions, in_channels, in_size), plus the frozen ``stem``'s."""
    from ktnas.engine.spaces import space_of

    p, m = count(meta_network(space_of(genotype), genotype, build), network_input(build))
    return Cost(p, m) + (stem or Cost(0, 0))


class CostModel:
    """The cost of every genotype of a space on one layout as ``fixed + Σ_cell types Σ_edges table[op]``.

    ``table[cell type]`` is an [edges, ops, 2] integer array (weights, multiply-adds summed over the network's
    cells of that type); ``fixed`` everything that does not depend on the genotype (stem, preprocessing of the
    cells, reductions the space fixes, classifier). Read off the space's probe genotypes (every op on every edge),
    each built once on the meta device; a probe that disagrees with another about an edge or the fixed part (a
    space whose cost does not add up) is refused."""

    def __init__(self, space, build: dict, stem: Cost | None = None):
        self.space, self.build, self.stem = space, dict(build), stem or Cost(0, 0)
        key = (space.name, tuple(sorted(self.build.items())))
        if key in _TABLES:  # read once per process and layout
            self.table, self.fixed = _TABLES[key]
            return
        n_edges, n_ops = len(space.edge_list()), len(space.ops)
        self.table = {t: np.full((n_edges, n_ops, 2), -1, dtype=np.int64) for t in space.cell_types}
        fixed = set()
        for genotype in space.cost_probes():
            fixed.add(self._read_probe(genotype))
        if len(fixed) != 1:
            raise KtnasError(f"the {space.name} space's cost does not add up over its edges (fixed parts {fixed})")
        self.fixed = fixed.pop()
        for t, tab in self.table.items():
            for k, op in enumerate(space.ops):
                if op in space.never_picked:
                    tab[:, k] = 0
            if (tab < 0).any():
                raise KtnasError(f"the {space.name} space's cost probes leave an edge of its {t} cell unmeasured")
        _TABLES[key] = self.table, self.fixed

    def _read_probe(self, genotype) -> tuple[int, int]:
        net, x = meta_network(self.space, genotype, self.build), network_input(self.build)
        params, macs = _module_counts(net, x)
        total = np.array([params[""] - params.get(AUX, 0), macs.get("", 0)], dtype=np.int64)
        seen: dict[tuple[str, int, int], np.ndarray] = {}
        for _, t, edge, op, path in cell_ops(self.space, net, genotype):
            key = (t, edge, self.space.ops.index(op))
            seen[key] = seen.get(key, 0) + np.array([params[path], macs.get(path, 0)], dtype=np.int64)
        for (t, edge, op), c in seen.items():
            old = self.table[t][edge, op]
            if (old >= 0).all() and not (old == c).all():
                raise KtnasError(f"the {self.space.name} space's cost of {self.space.ops[op]} on edge {edge} "
                                 f"differs between probes ({old.tolist()} vs {c.tolist()})")
            self.table[t][edge, op] = c
            total -= c
        return int(total[0]), int(total[1])

    def cost(self, genotype) -> Cost:
        """The genotype's cost, from the table (equal to :func:`genotype_cost`)."""
        p, m = self.fixed
        for t in self.table:
            for edge, op in self.space.cell_edges(genotype, t):
                p_e, m_e = self.table[t][edge, self.space.ops.index(op)]
                p, m = p + int(p_e), m + int(m_e)
        return Cost(p, m) + self.stem

    def expected(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The expected (weights, multiply-adds) under ``probs`` {cell type: [edges, ops] op probabilities}, as a
        differentiable tensor of 2: ProxylessNAS' and FBNet's expected cost of a mixed op, summed."""
        out = torch.tensor([float(v) for v in self.fixed], dtype=torch.float64)
        for t, p in probs.items():
            out = out + (p.double()[..., None] * torch.as_tensor(self.table[t], dtype=torch.float64)).sum((0, 1))
        return out + torch.tensor([float(self.stem.params), float(self.stem.macs)], dtype=torch.float64)


def cell_ops(space, net: nn.Module, genotype):
    """(cell index, cell type, edge, op name, module path) of every op in a built network's searched cells, in
    order; blocks the space fixes (NB201's ResNet reductions) are skipped."""
    for k, cell in enumerate(net.cells):
        if not hasattr(cell, "ops"):
            continue
        t = space.cell_types[1] if getattr(cell, "reduction", False) else space.cell_types[0]
        for (path, _), (edge, op) in zip(_flat(cell.ops, f"cells.{k}.ops"), space.cell_edges(genotype, t)):
            yield k, t, edge, op, path


def _flat(modules, prefix: str):
    """The op modules of a cell in order, (path, module): DARTS' list, NB201's list per node."""
    for name, m in modules.named_children():
        if isinstance(m, nn.ModuleList):
            yield from _flat(m, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", m
