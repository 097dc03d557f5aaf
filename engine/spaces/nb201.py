"""The NAS-Bench-201 space (Dong & Yang 2020; AutoDL's ``TinyNetwork*`` and ``InferCell``).

Node j = 1..3 of a cell takes one edge from each of the nodes 0..j-1, in the order (1<-0), (2<-0), (2<-1),
(3<-0), (3<-1), (3<-2) (the rows of an alpha matrix); the cell's output is its last node. A genotype prints as
the benchmark's architecture string, so a result can be looked up there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch.nn as nn

from ktnas.cache.errors import KtnasError

from ktnas.engine.ops import OPS, ReLUConvBN
from ktnas.engine.plots import draw_dag
from ktnas.engine.spaces.base import (SearchSpace, as_array, check_op, expect_space, other, pairs, register_space,
                                      save_genotype, stem_label)

NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")


@dataclass
class NB201Genotype:
    """A NAS-Bench-201 cell: ``edges[j-1]`` lists the (op, source node) pairs into node j, sources 0..j-1. A space
    of the same cell with other ops subclasses it with its own ``space_name`` and ``OPS``."""
    edges: list[list[tuple[str, int]]]
    space_name: ClassVar[str] = "nb201"
    OPS: ClassVar[tuple[str, ...]] = NB201_OPS

    def __post_init__(self):
        name = self.space_name
        if not isinstance(self.edges, (list, tuple)) or not self.edges:
            raise KtnasError(f"{name} genotype needs a non-empty list of nodes, got {self.edges!r:.80}")
        nodes = []
        for j, node in enumerate(self.edges, 1):
            node = pairs(node, f"{name} node {j}")
            for op, _ in node:
                check_op(op, self.OPS, f"{name} node {j}")
            if sorted(src for _, src in node) != list(range(j)):
                raise KtnasError(f"{name} node {j} must take one edge from each of nodes 0..{j - 1}, "
                                 f"got sources {[src for _, src in node]}")
            nodes.append(node)
        self.edges = nodes

    def to_string(self) -> str:
        """NAS-Bench-201's form, e.g. ``|nor_conv_3x3~0|+|skip_connect~0|none~1|+|...|``."""
        return "+".join("|" + "|".join(f"{op}~{src}" for op, src in node) + "|" for node in self.edges)

    __str__ = to_string

    @classmethod
    def from_string(cls, s: str) -> "NB201Genotype":
        if not isinstance(s, str) or not s:
            raise KtnasError(f"not a NAS-Bench-201 architecture string: {s!r:.80}")
        nodes = []
        for part in s.split("+"):
            if len(part) < 2 or part[0] != "|" or part[-1] != "|":
                raise KtnasError(f"not a NAS-Bench-201 architecture string: {s!r:.120} (node {part!r:.40} must "
                                 f"read |op~src|...|)")
            node = []
            for item in part[1:-1].split("|"):
                op, sep, src = item.partition("~")
                if not sep or not src.isdigit():
                    raise KtnasError(f"not a NAS-Bench-201 architecture string: {s!r:.120} (bad entry {item!r:.40}"
                                     f", expected op~source)")
                node.append((op, int(src)))
            nodes.append(node)
        return cls(nodes)

    def to_json(self) -> dict:
        return {"space": self.space_name, "arch_str": self.to_string(),
                "edges": [[list(p) for p in n] for n in self.edges]}

    @classmethod
    def from_json(cls, d: dict) -> "NB201Genotype":
        expect_space(d, cls.space_name)
        if "edges" not in d and "arch_str" not in d:
            raise KtnasError(f"{cls.space_name} genotype lacks both 'edges' and 'arch_str'")
        g = cls(d["edges"]) if "edges" in d else cls.from_string(d["arch_str"])
        if "arch_str" in d and d["arch_str"] != g.to_string():
            raise KtnasError(f"{cls.space_name} genotype's arch_str {d['arch_str']!r:.120} disagrees with its edges "
                             f"({g.to_string()})")
        return g

    def save(self, path) -> Path:
        return save_genotype(self, path)


def derive_nb201(alpha, ops: tuple[str, ...] = NB201_OPS, genotype: type = NB201Genotype) -> NB201Genotype:
    """The NB201 genotype of architecture weights [edges, ops]: argmax per edge, 'none' included (as AutoDL)."""
    a = as_array(alpha)
    nodes = int(round((math.sqrt(8 * a.shape[0] + 1) - 1) / 2))
    if nodes * (nodes + 1) // 2 != a.shape[0] or nodes < 1 or a.shape[1] != len(ops):
        raise KtnasError(f"alpha has shape {a.shape}, expected (6, {len(ops)}) (a triangular number of edges)")
    rows = iter(a.argmax(-1))
    return genotype([[(ops[next(rows)], i) for i in range(j)] for j in range(1, nodes + 1)])


# ------------------------------------------------------------------------------------------- the networks
class ResNetBasicBlock(nn.Module):
    """NAS-Bench-201's reduction: two 3x3 ReLUConvBN (the first strided) plus an avg-pool + 1x1 conv shortcut.
    ``ceil_mode``: the shortcut's pooling rounds odd sizes up, as the strided conv does (both networks use it; at
    the even sizes of NB201's own 32 px inputs it pools as NB201's code)."""

    def __init__(self, C_in, C_out, ceil_mode: bool = False):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, 2, 1, affine=True)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, affine=True)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=ceil_mode), nn.Conv2d(C_in, C_out, 1, bias=False))
        self.reduction, self.out_channels = True, C_out

    def forward(self, x):
        return self.conv_b(self.conv_a(x)) + self.downsample(x)


class SearchCell(nn.Module):
    """NAS-Bench-201's search cell: node j sums its mixed edges from nodes 0..j-1; the output is the last node."""

    def __init__(self, edge_list, C, edge):
        super().__init__()
        self.pairs = edge_list
        self.edges = nn.ModuleList(edge(C, 1) for _ in self.pairs)
        self.reduction, self.out_channels = False, C

    def forward(self, x, weights, index=None, edge_w=None):
        nodes = [x]
        for e, (j, i) in enumerate(self.pairs):
            if len(nodes) <= j:
                nodes.append(0)
            y = self.edges[e](nodes[i], weights[e], None if index is None else int(index[e]))
            nodes[j] = nodes[j] + (y if edge_w is None else edge_w[e] * y)
        return nodes[-1]


def search_cells(edge_list, C_stem: int, layout, edge) -> tuple[nn.ModuleList, nn.Module, int]:
    """The supernet's positions (search cells, a ResNet block at each reduction), its head (BN + ReLU) and width."""
    if len(layout.reductions) == layout.layers:
        raise KtnasError("an nb201 supernet needs at least one search cell: pass fewer --reductions")
    cells, C, C_p = nn.ModuleList(), layout.channels, C_stem
    for i in range(layout.layers):
        if i in layout.reductions:
            C = C * 2
            cells.append(ResNetBasicBlock(C_p, C, ceil_mode=True))
        else:
            cells.append(SearchCell(edge_list, C, edge))
        C_p = C
    return cells, nn.Sequential(nn.BatchNorm2d(C_p), nn.ReLU()), C_p


class InferCell(nn.Module):
    """NAS-Bench-201's InferCell: node j is the sum of its incoming edges' ops; the last node is the output."""

    def __init__(self, genotype: NB201Genotype, C):
        super().__init__()
        self.sources = [[src for _, src in node] for node in genotype.edges]
        self.ops = nn.ModuleList(nn.ModuleList(OPS[op](C, 1, True) for op, _ in node) for node in genotype.edges)

    def forward(self, x):
        nodes = [x]
        for ops, sources in zip(self.ops, self.sources):
            nodes.append(sum(op(nodes[s]) for op, s in zip(ops, sources)))
        return nodes[-1]


class NetworkNB201(nn.Module):
    """NAS-Bench-201's TinyNetwork on a built layout; ``forward`` -> (logits, None)."""

    def __init__(self, genotype: NB201Genotype, num_classes: int, layout, stem: nn.Module, C_stem: int):
        super().__init__()
        self.stem, self.layout = stem, [f"{stem_label(stem)} -> {C_stem}"]
        self.drop_path_prob = 0.0  # NB201's recipe has no drop path
        cells, C, stage, run = [], layout.channels, 3 - layout.stages, 0
        for i in range(layout.layers + 1):
            if i == layout.layers or i in layout.reductions:
                if run:
                    self.layout.append(f"stage {stage}: {run} cells C={C}")
                if i == layout.layers:
                    break
                cells.append(ResNetBasicBlock(C, 2 * C, ceil_mode=True))  # odd sizes as the search network
                C, stage, run = 2 * C, stage + 1, 0
                self.layout.append(f"resnet basic block /2 -> {C}")
            else:
                cells.append(InferCell(genotype, C))
                run += 1
        self.cells = nn.Sequential(*cells)
        self.lastact = nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C, num_classes)

    def forward(self, x):
        out = self.lastact(self.cells(self.stem(x)))
        return self.classifier(self.global_pooling(out).flatten(1)), None


# ------------------------------------------------------------------------------------------------ the space
class NB201Space(SearchSpace):
    name, ops, steps, edges, pool_bn = "nb201", NB201_OPS, 3, 6, False
    cell_types, stem_multiplier, genotype = ("cell",), 1, NB201Genotype
    reference = {"search": (17, 16), "eval": (17, 16)}  # 3 stages of 5 cells and 2 ResNet blocks, C=16
    proxy = (8, 16)  # 2 cells per stage, 3 stages, 2 ResNet blocks: 8 positions
    text_form, json_keys = "nb201", (("arch_str",), ("edges",))

    def looks_like(self, text):
        return text.startswith("|") and self.text_form is not None

    def parse_text(self, text, name=None):
        return self.genotype.from_string(text)

    def format_text(self, genotype):
        return genotype.to_string()

    def edge_list(self):
        """(node 1..steps, source node 0..node-1)."""
        return [(j, i) for j in range(1, self.steps + 1) for i in range(j)]

    def reductions(self, layers, stages=3):
        """ResNet blocks splitting ``layers`` positions into ``stages`` stages of equal cell count."""
        n = (layers - (stages - 1)) // stages
        return tuple(k * (n + 1) - 1 for k in range(1, stages)) if n >= 1 else ()

    def random_genotype(self, rng):
        """Any op on every edge."""
        return self.genotype([[(self.ops[rng.integers(len(self.ops))], i) for i in range(j)]
                              for j in range(1, self.steps + 1)])

    def mutate(self, genotype, rng):
        """One edge's op replaced by another op."""
        edges = [list(node) for node in genotype.edges]
        slots = [(j, p) for j, node in enumerate(edges) for p in range(len(node))]
        j, p = slots[rng.integers(len(slots))]
        op, src = edges[j][p]
        new = other(self.ops, op, rng)
        edges[j][p] = (new, src)
        return self.genotype(edges), f"edge {src}->{j + 1}: {op} -> {new}"

    def derive(self, alphas, edge_weights=None):
        return derive_nb201(alphas["cell"], self.ops, self.genotype)

    def cell_edges(self, genotype, cell_type):
        edges = self.edge_list()
        return [(edges.index((j, src)), op) for j, node in enumerate(genotype.edges, 1) for op, src in node]

    def cost_probes(self):
        """Per op, the cell with that op on all its edges."""
        return [self.genotype([[(op, src) for src in range(j)] for j in range(1, self.steps + 1)]) for op in self.ops]

    def encode(self, genotype):
        ops = {(j, src): op for j, node in enumerate(genotype.edges, 1) for op, src in node}
        return {"cell": [self.ops.index(ops[e]) for e in self.edge_list()]}

    def node_types(self):
        return ("in0", "out", *self.ops)

    def graph(self, genotype):
        """One cell of 8 nodes: the input, the 6 edges' ops in edge order, the output; an op node reads the op
        nodes summed into its source node (or the input), the output the op nodes of the last node."""
        T, steps, edge_list = self.node_types(), len(genotype.edges), self.edge_list()
        pos = {e: 1 + k for k, e in enumerate(edge_list)}
        ops = {(j, src): op for j, node in enumerate(genotype.edges, 1) for op, src in node}
        n = len(edge_list) + 2
        types = [T.index("in0")] + [T.index(ops[e]) for e in edge_list] + [T.index("out")]
        links = []
        for j, i in edge_list:
            links += [(pos[(j, i)], 0)] if i == 0 else [(pos[(j, i)], pos[(i, s)]) for s in range(i)]
        links += [(n - 1, pos[(steps, i)]) for i in range(steps)]
        return [(types, links, n)]

    def count_skips(self, genotype):
        """skip_connect edges in the cell."""
        return sum(op == "skip_connect" for node in genotype.edges for op, _ in node)

    def short(self, genotype):
        return genotype.to_string()

    def search_cells(self, stem_channels, layout, edge):
        return search_cells(self.edge_list(), stem_channels, layout, edge)

    def forward_cells(self, cells, s, arch, edge_weights):
        for cell in cells:
            s = cell(s) if cell.reduction else cell(s, *arch["cell"], edge_weights("cell"))
        return s

    def network(self, genotype, num_classes, layout, *, stem, stem_channels, auxiliary):
        if auxiliary:
            raise KtnasError("NAS-Bench-201 networks have no auxiliary head: drop --auxiliary")
        return NetworkNB201(genotype, num_classes, layout, stem, stem_channels)

    def draw(self, genotype, out_dir):
        n = len(genotype.edges) + 1
        edges = [(i, j, op) for j, node in enumerate(genotype.edges, 1) for op, i in node if op != "none"]
        path = Path(out_dir) / "cell.png"
        draw_dag({i: (2.0 * i, 0) for i in range(n)}, [str(i) for i in range(n)], edges, path,
                 title="NAS-Bench-201 cell ('none' edges not drawn)", curved=True)
        return [path]


register_space(NB201Space())
