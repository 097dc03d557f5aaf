"""What every search space provides (one file per space implements it) and the helpers genotypes share."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ktnas.cache.errors import KtnasError


class SearchSpace:
    """A cell search space: its ops, cell types, the order of a cell's edges, and everything built from them.

    Class attributes a space sets: ``name``, ``ops`` (alpha-column order), ``steps`` (intermediate nodes),
    ``edges`` (alpha rows), ``pool_bn`` (pools followed by an affine-free BN in the mixed op), ``cell_types``
    (one alpha matrix each), ``stem_multiplier`` (the conv stem's width over C), ``reference`` (the papers'
    (layers, channels) of the search and the evaluation network, on 32 px images), ``proxy`` (the (layers,
    channels) of the small network ``ktnas evolve`` trains per candidate), ``genotype`` (its class: ``to_json``,
    ``from_json``, ``save``), ``text_form`` (the name of the papers' own text form of its genotypes, None when it
    has none) and ``json_keys`` (the sets of keys, any one of which says a genotype JSON without a ``"space"`` key
    is this space's), ``never_picked`` (ops its derivation never picks for an edge: DARTS' 'none'),
    ``chooses_inputs`` (its derivation keeps some of a node's input edges only: DARTS' 2).
    Everything else ktnas reads of a space is a method below.
    """
    name: str
    ops: tuple[str, ...]
    steps: int
    edges: int
    pool_bn: bool
    cell_types: tuple[str, ...]
    stem_multiplier: int
    reference: dict[str, tuple[int, int]]
    proxy: tuple[int, int] = (8, 16)
    genotype: type
    text_form: str | None = None
    never_picked: tuple[str, ...] = ()  # ops the derivation never chooses for an edge (DARTS: 'none')
    chooses_inputs: bool = False  # the derivation keeps some of a node's input edges only (DARTS: 2 of them)
    json_keys: tuple[tuple[str, ...], ...] = ()

    def claims_json(self, d: dict) -> bool:
        """Whether a genotype JSON without ``"space"`` is this space's (it has one of the ``json_keys`` sets)."""
        return any(all(k in d for k in keys) for keys in self.json_keys)

    def json_keys_text(self) -> str:
        return " or ".join(" and ".join(map(repr, keys)) for keys in self.json_keys)

    def pickable(self) -> list[int]:
        """Indices of the ops the derivation may pick for an edge (all but ``never_picked``)."""
        return [j for j, op in enumerate(self.ops) if op not in self.never_picked]

    # ---------------------------------------------------------------------------------------- text forms
    def looks_like(self, text: str) -> bool:
        """Whether ``text`` (stripped) is in this space's ``text_form``."""
        return False

    def parse_text(self, text: str, name: str | None = None):
        """The genotype of ``text`` in this space's ``text_form`` (``name``: which of several, when it holds
        several named ones)."""
        raise KtnasError(f"the {self.name} space has no text form: pass its genotype as JSON")

    def format_text(self, genotype) -> str:
        """The genotype in this space's ``text_form``."""
        raise KtnasError(f"the {self.name} space has no text form: use --format json")

    # ------------------------------------------------------------------------------------------ the graph
    def edge_list(self) -> list[tuple[int, int]]:
        """(node, input) of each edge in alpha-row order: the one place a cell's edge order is defined."""
        raise NotImplementedError

    def node_edges(self) -> list[int]:
        """Incoming edges per intermediate node, in edge order (PC-DARTS' edge normalisation groups)."""
        counts: dict[int, int] = {}
        for node, _ in self.edge_list():
            counts[node] = counts.get(node, 0) + 1
        return list(counts.values())

    def reductions(self, layers: int, stages: int = 3) -> tuple[int, ...]:
        """Positions of the reductions in a network of ``layers`` cells split into ``stages`` equal stages."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- genotypes
    def random_genotype(self, rng: np.random.Generator):
        raise NotImplementedError

    def mutate(self, genotype, rng: np.random.Generator):
        """A child differing in one place: (child, description)."""
        raise NotImplementedError

    def derive(self, alphas: dict, edge_weights: dict | None = None):
        """The genotype of architecture weights {cell type: [edges, ops]} (numpy or torch);
        ``edge_weights`` {cell type: [edges]} (PC-DARTS) scale softmax(alpha) before the choice."""
        raise NotImplementedError

    def cell_edges(self, genotype, cell_type: str) -> list[tuple[int, str]]:
        """(edge index in :meth:`edge_list`, op) of every op module of a cell of ``cell_type``, in the order the
        evaluation cell holds them (the cost model reads each module's cost through it)."""
        raise KtnasError(f"the {self.name} space has no cost model (cell_edges)")

    def cost_probes(self) -> list:
        """Genotypes that together put every op (but :attr:`never_picked`) on every edge of every cell type."""
        raise KtnasError(f"the {self.name} space has no cost model (cost_probes)")

    def encode(self, genotype) -> dict[str, list[int]]:
        """{cell type: op index per edge} of a genotype ('none' on the edges it does not use)."""
        raise NotImplementedError

    def alphas_of(self, genotype, scale: float = 5.0) -> dict[str, np.ndarray]:
        """Architecture weights {cell type: [edges, ops]} whose :meth:`derive` gives ``genotype`` back: ``scale``
        on each edge's op (random search's result, stored as its final alphas)."""
        return {t: np.eye(len(self.ops))[idx] * scale for t, idx in self.encode(genotype).items()}

    def graph(self, genotype) -> list[tuple[list[int], list[tuple[int, int]], int]]:
        """The genotype's cells as DAGs with the ops as nodes: per cell (node types, (dst, src) links, nodes),
        node types indexing :meth:`node_types`."""
        raise NotImplementedError

    def node_types(self) -> tuple[str, ...]:
        raise NotImplementedError

    def count_skips(self, genotype) -> int:
        raise NotImplementedError

    def short(self, genotype) -> str:
        """One line for logs and metrics."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- networks
    def search_cells(self, stem_channels: int, layout, edge):
        """The supernet's cells for a built ``layout``: (nn.ModuleList, head module, output width);
        ``edge(C, stride)`` builds one mixed edge."""
        raise NotImplementedError

    def forward_cells(self, cells, s, arch: dict, edge_weights):
        """The cells on the stem's output ``s`` under ``arch`` {cell type: (weights, index)};
        ``edge_weights(cell type)``: PC-DARTS' edge normalisation or None."""
        raise NotImplementedError

    def network(self, genotype, num_classes: int, layout, *, stem, stem_channels: int, auxiliary: bool):
        """The evaluation network of a genotype for a built ``layout`` after ``stem`` (``stem_channels`` wide)."""
        raise NotImplementedError

    def draw(self, genotype, out_dir) -> list[Path]:
        """Pictures of the genotype's cells written to ``out_dir``."""
        raise NotImplementedError


SPACES: dict[str, SearchSpace] = {}


def register_space(space: SearchSpace) -> SearchSpace:
    """Add a space (an instance) to ``ktnas search --space``, ``ktnas evolve``, the benchmarks and the genotype
    forms."""
    SPACES[space.name] = space
    return space


# ----------------------------------------------------------------------------------------------- helpers
def pairs(obj, what: str) -> list[tuple[str, int]]:
    """``obj`` as a list of (op, index) pairs, strictly typed (JSON gives lists)."""
    try:
        out = [(op, idx) for op, idx in obj]
    except (TypeError, ValueError):
        raise KtnasError(f"{what} must be a list of [op, input] pairs, got {obj!r:.80}") from None
    for op, idx in out:
        if not isinstance(op, str) or not isinstance(idx, int) or isinstance(idx, bool):
            raise KtnasError(f"{what}: [op, input] pair must be [string, integer], got [{op!r:.40}, {idx!r:.40}]")
    return out


def check_op(op: str, ops: tuple[str, ...], where: str) -> None:
    if op not in ops:
        raise KtnasError(f"unknown op {op!r} in {where}; valid ops: {', '.join(ops)}")


def expect_space(d, space: str) -> None:
    if not isinstance(d, dict):
        raise KtnasError(f"a genotype must be a JSON object, got {type(d).__name__}")
    if d.get("space") != space:
        raise KtnasError(f"genotype's space is {d.get('space')!r}, expected {space!r}")


def save_genotype(g, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(g.to_json(), indent=1) + "\n")
    return path


def as_array(a, what: str = "alpha") -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise KtnasError(f"{what} must be a 2-d [edges, ops] array, got shape {a.shape}")
    return a


def softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def alpha_entropy(alpha) -> float:
    """Mean over edges of the entropy (nats) of softmax(alpha); log(K) when uniform, 0 when one-hot."""
    p = softmax(as_array(alpha))
    return float(-(p * np.log(np.clip(p, 1e-300, None))).sum(-1).mean())


def other(options, current, rng: np.random.Generator):
    """A uniformly drawn element of ``options`` other than ``current``."""
    rest = [o for o in options if o != current]
    return rest[rng.integers(len(rest))]


def stem_label(stem) -> str:
    """How a network's layout names its input stem: the adapter on features or the conv stem on images."""
    return "adapter 1x1" if stem[0].kernel_size == (1, 1) else "conv stem 3x3"
