"""The DARTS space (Liu et al. 2019, ``cnn/genotypes.py``, ``model_search.py``, ``model.py``).

Intermediate node i (0-based) of a cell has 2+i incoming edges, from the two cell inputs (states 0, 1) and the
earlier nodes (states 2..i+1): 4 steps give 2+3+4+5 = 14 edges, in that order (the rows of an alpha matrix).
A genotype keeps per node two (op, input state) pairs, as DARTS' ``Genotype``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ktnas.cache.errors import KtnasError

from ktnas.engine.ops import OPS, AuxiliaryHead, FactorizedReduce, ReLUConvBN
from ktnas.engine.plots import draw_dag
from ktnas.engine.spaces.base import (SearchSpace, as_array, check_op, expect_space, other, pairs, register_space,
                                      save_genotype, softmax, stem_label)
from ktnas.engine.spaces.darts_text import darts_text, looks_like_darts_text, parse_darts_text

DARTS_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
             "dil_conv_3x3", "dil_conv_5x5")
CELLS = ("normal", "reduce")


def _cell(obj, cell: str) -> list[tuple[str, int]]:
    gene = pairs(obj, f"{cell} cell")
    if not gene or len(gene) % 2:
        raise KtnasError(f"{cell} cell must hold 2 (op, input) pairs per node, got {len(gene)} pairs")
    for k, (op, idx) in enumerate(gene):
        i = k // 2
        check_op(op, DARTS_OPS, f"{cell} cell node {i}")
        if not 0 <= idx < 2 + i:
            raise KtnasError(f"{cell} cell node {i}: input {idx} out of range; node {i} takes inputs 0..{i + 1}")
    return gene


def _concat(obj, cell: str, steps: int) -> list[int]:
    if not isinstance(obj, (list, tuple, range)) or not obj or \
            any(not isinstance(c, int) or isinstance(c, bool) for c in obj):
        raise KtnasError(f"{cell}_concat must be a non-empty list of node indices, got {obj!r:.80}")
    concat = list(obj)
    if len(set(concat)) != len(concat) or not all(2 <= c < 2 + steps for c in concat):
        raise KtnasError(f"{cell}_concat {concat} must list distinct intermediate nodes in 2..{steps + 1}")
    return concat


@dataclass
class DartsGenotype:
    """A DARTS cell pair: per intermediate node, two (op, input state) pairs; concat lists the output nodes."""
    normal: list[tuple[str, int]]
    normal_concat: list[int]
    reduce: list[tuple[str, int]]
    reduce_concat: list[int]

    def __post_init__(self):
        self.normal = _cell(self.normal, "normal")
        self.reduce = _cell(self.reduce, "reduce")
        if len(self.normal) != len(self.reduce):
            raise KtnasError(f"normal and reduce cells differ in node count ({len(self.normal) // 2} vs "
                             f"{len(self.reduce) // 2})")
        self.normal_concat = _concat(self.normal_concat, "normal", self.steps)
        self.reduce_concat = _concat(self.reduce_concat, "reduce", self.steps)

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def to_json(self) -> dict:
        return {"space": "darts", "normal": [list(p) for p in self.normal], "normal_concat": self.normal_concat,
                "reduce": [list(p) for p in self.reduce], "reduce_concat": self.reduce_concat}

    @classmethod
    def from_json(cls, d: dict) -> "DartsGenotype":
        expect_space(d, "darts")
        missing = [k for k in ("normal", "normal_concat", "reduce", "reduce_concat") if k not in d]
        if missing:
            raise KtnasError(f"darts genotype lacks key(s) {', '.join(missing)}")
        return cls(d["normal"], d["normal_concat"], d["reduce"], d["reduce_concat"])

    def save(self, path) -> Path:
        return save_genotype(self, path)


def parse_cell(w: np.ndarray, steps: int, ops: tuple[str, ...]) -> list[tuple[str, int]]:
    """DARTS' ``genotype()._parse``: per node the 2 edges with the strongest non-none op, and that op."""
    cand = [k for k, op in enumerate(ops) if op != "none"]
    gene, start = [], 0
    for i in range(steps):
        W = w[start:start + 2 + i]
        edges = sorted(range(2 + i), key=lambda j: -max(W[j][k] for k in cand))[:2]
        for j in edges:
            k_best = max(cand, key=lambda k: W[j][k])  # first maximum on ties, as DARTS' strict '>'
            gene.append((ops[k_best], j))
        start += 2 + i
    return gene


def derive_darts(alpha_normal, alpha_reduce, steps: int = 4, ops: tuple[str, ...] = DARTS_OPS) -> DartsGenotype:
    """The DARTS genotype of architecture weights [edges, ops] (torch or numpy); softmax is applied here."""
    n_edges = steps * (steps + 3) // 2
    ws = []
    for name, a in (("alpha_normal", alpha_normal), ("alpha_reduce", alpha_reduce)):
        a = as_array(a, name)
        if a.shape != (n_edges, len(ops)):
            raise KtnasError(f"{name} has shape {a.shape}, expected ({n_edges}, {len(ops)}) for {steps} steps")
        ws.append(softmax(a))
    concat = list(range(2, steps + 2))
    return DartsGenotype(parse_cell(ws[0], steps, ops), concat, parse_cell(ws[1], steps, ops), concat)


# ------------------------------------------------------------------------------------------- the networks
def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob``, scale the rest by 1 / keep (DARTS' drop_path)."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x.div(keep).mul(mask)


class SearchCell(nn.Module):
    """DARTS' search cell: preprocess both inputs, 4 nodes each summing its mixed edges, concat the nodes."""

    def __init__(self, steps, C_pp, C_p, C, reduction, reduction_prev, edge):
        super().__init__()
        self.reduction, self.steps = reduction, steps
        self.pre0 = FactorizedReduce(C_pp, C, affine=False) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0,
                                                                                              affine=False)
        self.pre1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(edge(C, 2 if reduction and j < 2 else 1) for i in range(steps) for j in range(2 + i))
        self.out_channels = steps * C

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


def search_cells(steps: int, C_stem: int, layout, edge) -> tuple[nn.ModuleList, nn.Module, int]:
    """The supernet's cells (each takes the two previous cells' outputs), its head and output width."""
    cells = nn.ModuleList()
    C, C_pp, C_p, red_prev = layout.channels, C_stem, C_stem, False
    for i in range(layout.layers):
        red = i in layout.reductions
        C = C * 2 if red else C
        cells.append(SearchCell(steps, C_pp, C_p, C, red, red_prev, edge))
        C_pp, C_p, red_prev = C_p, cells[-1].out_channels, red
    return cells, nn.Identity(), C_p


class Cell(nn.Module):
    """A DARTS evaluation cell: two inputs, ``steps`` nodes of two ops each, the concat nodes as output."""

    def __init__(self, genotype: DartsGenotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.preprocess0 = FactorizedReduce(C_prev_prev, C) if reduction_prev else \
            ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        gene, self.concat = (genotype.reduce, genotype.reduce_concat) if reduction else \
            (genotype.normal, genotype.normal_concat)
        self.reduction = reduction
        self.multiplier = len(self.concat)
        self.indices = [idx for _, idx in gene]
        self.ops = nn.ModuleList(OPS[name](C, 2 if reduction and idx < 2 else 1, True) for name, idx in gene)

    def forward(self, s0, s1, drop_prob: float = 0.0):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            hs = []
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.indices[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], nn.Identity):
                    h = drop_path(h, drop_prob)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class NetworkDARTS(nn.Module):
    """DARTS' NetworkCIFAR on a built layout; the auxiliary head follows the last reduction cell (DARTS': cell
    2*layers//3). ``stem``: the conv stem or the adapter; ``forward`` -> (logits, aux logits or None)."""

    def __init__(self, genotype: DartsGenotype, num_classes: int, layout, stem: nn.Module, C_stem: int,
                 auxiliary: bool = False):
        super().__init__()
        if auxiliary and not layout.reductions:
            raise KtnasError("the auxiliary head sits after the last reduction cell, and this network has none "
                             "(the stem replaces it): drop --auxiliary")
        self.stem, self.layout = stem, [f"{stem_label(stem)} -> {C_stem}"]
        self.drop_path_prob, self.aux_index = 0.0, None
        self.cells = nn.ModuleList()
        C_curr, C_pp, C_p, reduction_prev = layout.channels, C_stem, C_stem, False
        for i in range(layout.layers):
            reduction = i in layout.reductions
            C_curr = C_curr * 2 if reduction else C_curr
            self.cells.append(Cell(genotype, C_pp, C_p, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_pp, C_p = C_p, self.cells[-1].multiplier * C_curr
            self.layout.append(f"cell {layout.replaced + i}: {'reduce' if reduction else 'normal'} C={C_curr} -> "
                               f"{C_p}")
            if auxiliary and i == max(layout.reductions):
                self.aux_index, C_aux = i, C_p
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)

    def forward(self, x):
        s0 = s1 = self.stem(x)
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux


# ------------------------------------------------------------------------------------------------ the space
class DartsSpace(SearchSpace):
    name, ops, steps, edges, pool_bn = "darts", DARTS_OPS, 4, 14, True
    cell_types, stem_multiplier, genotype = CELLS, 3, DartsGenotype
    reference = {"search": (8, 16), "eval": (20, 36)}
    proxy = (8, 16)
    text_form, json_keys = "darts", (("normal", "reduce"),)
    never_picked, chooses_inputs = ("none",), True

    def looks_like(self, text):
        return looks_like_darts_text(text)

    def parse_text(self, text, name=None):
        return DartsGenotype.from_json(dict(parse_darts_text(text, name), space=self.name))

    def format_text(self, genotype):
        return darts_text(genotype)

    def alphas_of(self, genotype, scale=5.0):
        """The chosen op of each used edge at ``scale``, every other weight 0: the unused edges stay uniform, so
        the derivation's two strongest inputs per node are the used ones."""
        alphas = super().alphas_of(genotype, scale)
        for a in alphas.values():
            a[:, self.ops.index("none")] = 0
        return alphas

    def edge_list(self):
        """(node 0..steps-1, input state: 0, 1 the cell inputs, 2+i node i)."""
        return [(i, j) for i in range(self.steps) for j in range(2 + i)]

    def reductions(self, layers, stages=3):
        return tuple(sorted({k * layers // stages for k in range(1, stages)}))

    def random_genotype(self, rng):
        """Per node 2 distinct inputs, ops never 'none'."""
        ops = [op for op in self.ops if op != "none"]

        def cell():
            return [(ops[rng.integers(len(ops))], int(j))
                    for i in range(self.steps) for j in sorted(rng.choice(2 + i, size=2, replace=False))]

        concat = list(range(2, self.steps + 2))
        return DartsGenotype(cell(), concat, cell(), concat)

    def mutate(self, genotype, rng):
        """AmoebaNet's mutations, each with probability 1/2: in the normal or the reduction cell, one op replaced
        by another non-'none' op, or one input of a node replaced by another earlier state (the node's two inputs
        stay distinct; the pair is kept sorted by input)."""
        cell = CELLS[rng.integers(2)]
        gene = list(getattr(genotype, cell))
        if rng.random() < 0.5 or len(gene) < 4:
            k = int(rng.integers(len(gene)))
            op, idx = gene[k]
            new = other([o for o in self.ops if o != "none"], op, rng)
            gene[k] = (new, idx)
            what = f"{cell} node {k // 2}, input {idx}: {op} -> {new}"
        else:
            k = int(rng.integers(2, len(gene)))  # node 0 has no other input to move to
            i, (op, idx) = k // 2, gene[k]
            choices = [j for j in range(2 + i) if j not in (idx, gene[k ^ 1][1])]
            new = choices[rng.integers(len(choices))]
            gene[k] = (op, int(new))
            what = f"{cell} node {i}, {op}: input {idx} -> {new}"
        for i in range(len(gene) // 2):  # canonical form: a node's two (op, input) pairs sorted by input
            gene[2 * i:2 * i + 2] = sorted(gene[2 * i:2 * i + 2], key=lambda pair: pair[1])
        normal = gene if cell == "normal" else genotype.normal
        reduce = gene if cell == "reduce" else genotype.reduce
        return DartsGenotype(normal, list(genotype.normal_concat), reduce, list(genotype.reduce_concat)), what

    def derive(self, alphas, edge_weights=None):
        if edge_weights is None:
            return derive_darts(alphas["normal"], alphas["reduce"], self.steps, self.ops)
        gene = {t: parse_cell(softmax(as_array(alphas[t])) * as_array(edge_weights[t][:, None]), self.steps,
                              self.ops) for t in CELLS}
        concat = list(range(2, self.steps + 2))
        return DartsGenotype(gene["normal"], concat, gene["reduce"], concat)

    def cell_edges(self, genotype, cell_type):
        return [(k // 2 * (k // 2 + 3) // 2 + j, op) for k, (op, j) in enumerate(getattr(genotype, cell_type))]

    def cost_probes(self):
        """Per op, 3 genotypes: node i takes inputs (2r, 2r+1) mod (i+2), r = 0, 1, 2: every edge of both cells."""
        concat = list(range(2, 2 + self.steps))
        out = []
        for op in self.ops:
            if op not in self.never_picked:
                for r in range(3):
                    cell = [(op, (2 * r + d) % (i + 2)) for i in range(self.steps) for d in (0, 1)]
                    out.append(DartsGenotype(cell, concat, cell, concat))
        return out

    def encode(self, genotype):
        out = {}
        for t in CELLS:
            idx = [self.ops.index("none")] * self.edges
            for k, (op, j) in enumerate(getattr(genotype, t)):
                i = k // 2
                idx[i * (i + 3) // 2 + j] = self.ops.index(op)  # node i's edges start at 2+3+...+(i+1)
            out[t] = idx
        return out

    def node_types(self):
        return ("in0", "in1", "out", *self.ops)

    def graph(self, genotype):
        """Per cell 11 nodes: the 2 inputs, the 8 (op, input) pairs, the output; an op node reads the nodes that
        make its input state, the output the op nodes of the concatenated nodes."""
        T, cells = self.node_types(), []
        for gene, concat in ((genotype.normal, genotype.normal_concat), (genotype.reduce, genotype.reduce_concat)):
            n = len(gene) + 3
            types = [T.index("in0"), T.index("in1")] + [T.index(op) for op, _ in gene] + [T.index("out")]
            links = []
            for k, (_, idx) in enumerate(gene):
                links += [(2 + k, idx)] if idx < 2 else [(2 + k, 2 + 2 * (idx - 2)), (2 + k, 3 + 2 * (idx - 2))]
            links += [(n - 1, 2 + 2 * (c - 2) + s) for c in concat for s in (0, 1)]
            cells.append((types, links, n))
        return cells

    def count_skips(self, genotype):
        """skip_connect edges in the normal cell (the collapse indicator)."""
        return sum(op == "skip_connect" for op, _ in genotype.normal)

    def short(self, genotype):
        return " ".join(f"{t}=" + ",".join(f"{op}~{j}" for op, j in getattr(genotype, t)) for t in CELLS)

    def search_cells(self, stem_channels, layout, edge):
        return search_cells(self.steps, stem_channels, layout, edge)

    def forward_cells(self, cells, s, arch, edge_weights):
        s0 = s1 = s
        for cell in cells:
            t = "reduce" if cell.reduction else "normal"
            w, idx = arch[t]
            s0, s1 = s1, cell(s0, s1, w, idx, edge_weights(t))
        return s1

    def network(self, genotype, num_classes, layout, *, stem, stem_channels, auxiliary):
        return NetworkDARTS(genotype, num_classes, layout, stem, stem_channels, auxiliary)

    def draw(self, genotype, out_dir):
        paths = []
        for cell in CELLS:
            gene, steps = getattr(genotype, cell), genotype.steps
            names = ["c_{k-2}", "c_{k-1}"] + [str(i) for i in range(steps)] + ["c_{k}"]
            pos = {0: (0, 1.2), 1: (0, -1.2), **{2 + i: (1.6 + 1.4 * i, 1.1 * (-1) ** i) for i in range(steps)},
                   steps + 2: (1.6 + 1.4 * steps, 0)}
            edges = [(j, 2 + k // 2, op) for k, (op, j) in enumerate(gene)]
            edges += [(c, steps + 2, None) for c in getattr(genotype, f"{cell}_concat")]
            paths.append(Path(out_dir) / f"{cell}.png")
            draw_dag(pos, names, edges, paths[-1], title=f"{cell} cell", io_nodes=(0, 1, steps + 2))
        return paths


register_space(DartsSpace())
