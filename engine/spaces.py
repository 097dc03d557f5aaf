"""Search spaces (DARTS, NAS-Bench-201), their genotypes, and how a genotype is derived from architecture weights.

Edge order (the rows of an alpha matrix) follows the original code:
- DARTS (``model_search.py``): intermediate node i (0-based) has 2+i incoming edges, from the two cell inputs
  (states 0, 1) and the earlier nodes (states 2..i+1); 4 steps -> 2+3+4+5 = 14 edges.
- NAS-Bench-201: node j = 1..3 has incoming edges from nodes 0..j-1, in the order
  (1<-0), (2<-0), (2<-1), (3<-0), (3<-1), (3<-2).

Genotypes are plain dataclasses saved as JSON (never pasted into Python files). ``DartsGenotype`` means what DARTS'
``Genotype`` namedtuple means; ``NB201Genotype`` prints as NAS-Bench-201's architecture string, so a result can be
looked up in the benchmark.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ktnas.cache.errors import KtnasError

DARTS_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
             "dil_conv_3x3", "dil_conv_5x5")
NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")


@dataclass(frozen=True)
class SearchSpace:
    """A cell search space.

    ops: candidate operations, in alpha-column order. steps: intermediate nodes (DARTS: 4 besides the two cell
    inputs; NB201: 3 besides its input node 0). edges: edges per cell (alpha rows). pool_bn: whether pools are
    followed by an affine-free BN in the mixed op (DARTS' MixedOp adds one; NB201's search cell does not).
    """
    name: str
    ops: tuple[str, ...]
    steps: int
    edges: int
    pool_bn: bool

    def edge_list(self) -> list[tuple[int, int]]:
        """(node, input) of each edge in alpha-row order.

        DARTS: node 0..steps-1 among intermediate nodes, input a state index (0, 1: cell inputs; 2+i: node i).
        NB201: node 1..steps, input the source node 0..node-1.
        """
        if self.name == "darts":
            return [(i, j) for i in range(self.steps) for j in range(2 + i)]
        return [(j, i) for j in range(1, self.steps + 1) for i in range(j)]


SPACES = {
    "darts": SearchSpace("darts", DARTS_OPS, steps=4, edges=14, pool_bn=True),
    "nb201": SearchSpace("nb201", NB201_OPS, steps=3, edges=6, pool_bn=False),
}


def get_space(name: str) -> SearchSpace:
    """The search space called ``name`` ("darts" or "nb201")."""
    try:
        return SPACES[name]
    except (KeyError, TypeError):
        raise KtnasError(f"unknown search space {name!r}; choose one of: {', '.join(SPACES)}") from None


# ------------------------------------------------------------------------------------------------ genotypes
def _pairs(obj, what: str) -> list[tuple[str, int]]:
    """``obj`` as a list of (op, index) pairs, strictly typed (JSON gives lists)."""
    try:
        out = [(op, idx) for op, idx in obj]
    except (TypeError, ValueError):
        raise KtnasError(f"{what} must be a list of [op, input] pairs, got {obj!r:.80}") from None
    for op, idx in out:
        if not isinstance(op, str) or not isinstance(idx, int) or isinstance(idx, bool):
            raise KtnasError(f"{what}: [op, input] pair must be [string, integer], got [{op!r:.40}, {idx!r:.40}]")
    return out


def _check_op(op: str, ops: tuple[str, ...], where: str) -> None:
    if op not in ops:
        raise KtnasError(f"unknown op {op!r} in {where}; valid ops: {', '.join(ops)}")


def _darts_cell(obj, cell: str) -> list[tuple[str, int]]:
    gene = _pairs(obj, f"{cell} cell")
    if not gene or len(gene) % 2:
        raise KtnasError(f"{cell} cell must hold 2 (op, input) pairs per node, got {len(gene)} pairs")
    for k, (op, idx) in enumerate(gene):
        i = k // 2
        _check_op(op, DARTS_OPS, f"{cell} cell node {i}")
        if not 0 <= idx < 2 + i:
            raise KtnasError(f"{cell} cell node {i}: input {idx} out of range; node {i} takes inputs 0..{i + 1}")
    return gene


def _darts_concat(obj, cell: str, steps: int) -> list[int]:
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
        self.normal = _darts_cell(self.normal, "normal")
        self.reduce = _darts_cell(self.reduce, "reduce")
        if len(self.normal) != len(self.reduce):
            raise KtnasError(f"normal and reduce cells differ in node count ({len(self.normal) // 2} vs "
                             f"{len(self.reduce) // 2})")
        self.normal_concat = _darts_concat(self.normal_concat, "normal", self.steps)
        self.reduce_concat = _darts_concat(self.reduce_concat, "reduce", self.steps)

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def to_json(self) -> dict:
        return {"space": "darts", "normal": [list(p) for p in self.normal], "normal_concat": self.normal_concat,
                "reduce": [list(p) for p in self.reduce], "reduce_concat": self.reduce_concat}

    @classmethod
    def from_json(cls, d: dict) -> "DartsGenotype":
        _expect_space(d, "darts")
        missing = [k for k in ("normal", "normal_concat", "reduce", "reduce_concat") if k not in d]
        if missing:
            raise KtnasError(f"darts genotype lacks key(s) {', '.join(missing)}")
        return cls(d["normal"], d["normal_concat"], d["reduce"], d["reduce_concat"])

    def save(self, path) -> Path:
        return _save(self, path)


@dataclass
class NB201Genotype:
    """A NAS-Bench-201 cell: ``edges[j-1]`` lists the (op, source node) pairs into node j, sources 0..j-1."""
    edges: list[list[tuple[str, int]]]

    def __post_init__(self):
        if not isinstance(self.edges, (list, tuple)) or not self.edges:
            raise KtnasError(f"nb201 genotype needs a non-empty list of nodes, got {self.edges!r:.80}")
        nodes = []
        for j, node in enumerate(self.edges, 1):
            pairs = _pairs(node, f"nb201 node {j}")
            for op, _ in pairs:
                _check_op(op, NB201_OPS, f"nb201 node {j}")
            if sorted(src for _, src in pairs) != list(range(j)):
                raise KtnasError(f"nb201 node {j} must take one edge from each of nodes 0..{j - 1}, "
                                 f"got sources {[src for _, src in pairs]}")
            nodes.append(pairs)
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
        return {"space": "nb201", "arch_str": self.to_string(), "edges": [[list(p) for p in n] for n in self.edges]}

    @classmethod
    def from_json(cls, d: dict) -> "NB201Genotype":
        _expect_space(d, "nb201")
        if "edges" not in d and "arch_str" not in d:
            raise KtnasError("nb201 genotype lacks both 'edges' and 'arch_str'")
        g = cls(d["edges"]) if "edges" in d else cls.from_string(d["arch_str"])
        if "arch_str" in d and d["arch_str"] != g.to_string():
            raise KtnasError(f"nb201 genotype's arch_str {d['arch_str']!r:.120} disagrees with its edges "
                             f"({g.to_string()})")
        return g

    def save(self, path) -> Path:
        return _save(self, path)


Genotype = DartsGenotype | NB201Genotype
_GENOTYPES = {"darts": DartsGenotype, "nb201": NB201Genotype}


def _expect_space(d, space: str) -> None:
    if not isinstance(d, dict):
        raise KtnasError(f"a genotype must be a JSON object, got {type(d).__name__}")
    if d.get("space") != space:
        raise KtnasError(f"genotype's space is {d.get('space')!r}, expected {space!r}")


def _save(g, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(g.to_json(), indent=1) + "\n")
    return path


def genotype_from_json(d: dict) -> Genotype:
    """A genotype of the type its ``"space"`` key names."""
    if not isinstance(d, dict):
        raise KtnasError(f"a genotype must be a JSON object, got {type(d).__name__}")
    if d.get("space") not in _GENOTYPES:
        raise KtnasError(f"genotype's space {d.get('space')!r} is not one of: {', '.join(_GENOTYPES)}")
    return _GENOTYPES[d["space"]].from_json(d)


def load_genotype(path) -> Genotype:
    """Read a genotype JSON file (as written by ``save``); a missing or malformed file is a one-line KtnasError."""
    path = Path(path)
    hint = "pass a genotype.json written by ktnas search"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise KtnasError(f"{path}: no such genotype file; {hint}") from None
    except json.JSONDecodeError as e:
        raise KtnasError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KtnasError(f"{path}: cannot read genotype ({type(e).__name__}: {str(e).splitlines()[0]}); {hint}") \
            from None
    try:
        return genotype_from_json(d)
    except KtnasError as e:
        raise KtnasError(f"{path}: {e}; {hint}") from None


# ----------------------------------------------------------------------------------------------- derivation
def _as_array(a, what: str = "alpha") -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise KtnasError(f"{what} must be a 2-d [edges, ops] array, got shape {a.shape}")
    return a


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _parse_darts(w: np.ndarray, steps: int, ops: tuple[str, ...]) -> list[tuple[str, int]]:
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
        a = _as_array(a, name)
        if a.shape != (n_edges, len(ops)):
            raise KtnasError(f"{name} has shape {a.shape}, expected ({n_edges}, {len(ops)}) for {steps} steps")
        ws.append(_softmax(a))
    concat = list(range(2, steps + 2))
    return DartsGenotype(_parse_darts(ws[0], steps, ops), concat, _parse_darts(ws[1], steps, ops), concat)


def derive_nb201(alpha, ops: tuple[str, ...] = NB201_OPS) -> NB201Genotype:
    """The NB201 genotype of architecture weights [edges, ops]: argmax per edge, 'none' included (as AutoDL)."""
    a = _as_array(alpha)
    nodes = int(round((math.sqrt(8 * a.shape[0] + 1) - 1) / 2))
    if nodes * (nodes + 1) // 2 != a.shape[0] or nodes < 1 or a.shape[1] != len(ops):
        raise KtnasError(f"alpha has shape {a.shape}, expected (6, {len(ops)}) (a triangular number of edges)")
    best = a.argmax(-1)
    rows = iter(best)
    return NB201Genotype([[(ops[next(rows)], i) for i in range(j)] for j in range(1, nodes + 1)])


# ---------------------------------------------------------------------------------------------- diagnostics
def alpha_entropy(alpha) -> float:
    """Mean over edges of the entropy (nats) of softmax(alpha); log(K) when uniform, 0 when one-hot."""
    p = _softmax(_as_array(alpha))
    return float(-(p * np.log(np.clip(p, 1e-300, None))).sum(-1).mean())


def count_skips(genotype: Genotype) -> int:
    """skip_connect edges: in the normal cell (DARTS; the collapse indicator), in all edges (NB201)."""
    if isinstance(genotype, DartsGenotype):
        return sum(op == "skip_connect" for op, _ in genotype.normal)
    return sum(op == "skip_connect" for node in genotype.edges for op, _ in node)


def random_genotype(space: SearchSpace | str, rng: np.random.Generator) -> Genotype:
    """A uniformly sampled valid genotype. DARTS: per node 2 distinct inputs, ops never 'none'; NB201: any op."""
    space = get_space(space) if isinstance(space, str) else space
    if space.name == "darts":
        ops = [op for op in space.ops if op != "none"]

        def cell():
            return [(ops[rng.integers(len(ops))], int(j))
                    for i in range(space.steps) for j in sorted(rng.choice(2 + i, size=2, replace=False))]

        concat = list(range(2, space.steps + 2))
        return DartsGenotype(cell(), concat, cell(), concat)
    return NB201Genotype([[(space.ops[rng.integers(len(space.ops))], i) for i in range(j)]
                          for j in range(1, space.steps + 1)])
