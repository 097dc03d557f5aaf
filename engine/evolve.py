"""``ktnas evolve``: sample-based architecture search on cached stem features, every candidate trained for real.

Once the frozen stem's features are cached, a stand-alone candidate network costs only its own cells, so the
second family of NAS algorithms, where each candidate is trained and measured, becomes cheap as well. One Python
call, :func:`evolve` (``EvolveConfig`` -> summary dict); the CLI maps its flags onto the config.

Algorithms (``algo``), all with a budget of ``population + cycles`` trained candidates:

- ``random``: architectures sampled uniformly (:func:`~ktnas.engine.spaces.random_genotype`), the most accurate on
  validation kept.
- ``rea``: regularized (aging) evolution (Real et al. 2019, Algorithm 1): ``population`` random candidates, then
  per cycle a tournament of ``sample`` candidates drawn (with replacement) from the population, whose most
  accurate one is mutated (:func:`mutate`: one op, or for DARTS one input edge, of one cell); the child joins the
  population and the oldest member leaves it, so the population is always the last ``population`` candidates.
- ``predictor``: the same evolution, guided by a learned performance predictor (:class:`ArchPredictor`): a small
  graph network over the cell DAG (ops as nodes, :func:`arch_graph`), pre-trained without labels on
  ``pretrain_archs`` sampled architectures (a masked graph autoencoder: it reconstructs masked ops and the
  adjacency, after arch2vec / GraphMAE), then, every cycle, fine-tuned from that pre-trained state on all the
  candidates evaluated so far with a pairwise margin-ranking loss (it learns to order architectures, not to
  regress their accuracy). Each cycle ``pool`` distinct unseen children are made by tournament + mutation, the
  predictor ranks them and only the top ``parallel`` are trained. At the end the predictor's ranking quality is
  measured on held-out candidates: ``cv_folds``-fold cross-validation over the evaluated candidates (fit on the
  other folds, Kendall tau-b on the held-out fold; mean, per fold and its standard error in ``results.json``).

Candidates: the genotype's evaluation network (:func:`~ktnas.engine.network.build_network`) at a proxy size
(``layers``/``channels``; by default NB201 2 cells per stage, C=16, DARTS 8 cells, C=16, the stem replacing the
cells above its resolution), trained from scratch for ``epochs_per_candidate`` epochs by ``ktnas train``'s own
step (:func:`~ktnas.engine.train.run_epoch`: SGD, momentum, weight decay, gradient clipping; cosine to 0 over the
candidate's steps; no drop path, no auxiliary head) on the search-train part of the store's train split, and
measured on the search-validation part (``train_portion`` splits it by a permutation seeded by ``seed``, as in
``ktnas search``; the test split is never looked at). ``parallel`` candidates train at once, in lock-step on the
same batches (read once, and with ``on_the_fly`` run through the stem once, for all of them), each on its own
CUDA stream on a GPU. A candidate's initial weights come from a seed of (seed, its index) and every candidate
sees the same batches, so its result does not depend on which others it trained with. With ``on_the_fly`` the
candidates train on augmented images through the frozen stem instead (for comparing costs).

Randomness: every draw of group g (the candidates from index i on) comes from a generator seeded by (seed, i),
the predictor's by (seed, i) as well, so a run killed and resumed (``resume``) ends with exactly the history of an
uninterrupted one. ``stop_after`` stops once that many candidates are trained (continue with ``resume``); a
larger ``cycles`` on resume extends a finished run.

Run directory: ``config.json`` (resolved configuration), ``candidates.jsonl`` (every evaluated candidate:
index, genotype, validation accuracy and loss, train accuracy and loss, cost: parameters, forward FLOPs per
sample, seconds; its origin, parent, mutation and predicted score), ``genotype.json`` (the most accurate
candidate on validation, ties broken by lower validation loss, then the earlier; what ``ktnas train --genotype``
takes), ``results.json`` (summary: best candidate, best-so-far curve, candidates per hour, predictor tau),
``accuracy.png`` (validation accuracy over evaluated candidates, and the best so far) and ``checkpoint.pt``
(after every group, atomic).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ktnas.cache.errors import KtnasError, first_line
from ktnas.cache.precompute import DEFAULT_OUT, resolve_device

from .network import build_network
from .runs import atomic_save, atomic_write, atomic_write_jsonl, atomic_write_text, rng_state, set_rng_state
from .search import _split_indices, genotype_str
from .spaces import (DARTS_OPS, NB201_OPS, DartsGenotype, NB201Genotype, genotype_from_json, get_space,
                     random_genotype)
from .train import TrainConfig, make_optimizer, run_epoch

__all__ = ["EvolveConfig", "evolve", "mutate", "arch_graph", "ArchPredictor", "pretrain_predictor", "fit_ranker",
           "predict_scores", "heldout_tau", "kendall_tau", "CandidateTrainer", "plot_accuracy", "add_evolve_parser"]

ALGOS = ("random", "rea", "predictor")
PROXY = {"nb201": dict(layers=2, channels=16), "darts": dict(layers=8, channels=16)}
_NOT_COMPARED = ("out", "resume", "progress", "stop_after", "device", "workers", "cycles")
_TAG_INIT, _TAG_PRETRAIN, _TAG_CV = 1, 2, 3  # seed-sequence tags: candidate weights, pre-training, CV folds


@dataclass
class EvolveConfig:
    """Everything ``ktnas evolve`` takes (see the module docstring). ``None``: the proxy network's size for the
    space (``PROXY``); ``parallel`` None: 1 on the CPU, 8 on CUDA (a resumed run keeps its own)."""

    features: str = DEFAULT_OUT         # the feature store
    out: str = "runs/evolve"
    space: str = "nb201"                # nb201 | darts
    algo: str = "rea"                   # random | rea | predictor
    population: int = 20                # P: initial random candidates, then the aging population's size
    sample: int = 5                     # S: tournament size
    cycles: int = 80                    # candidates trained after the initial population (budget: P + cycles)
    epochs_per_candidate: int = 1
    batch_size: int = 128
    lr: float = 0.1                     # cosine to 0 over the candidate's steps
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 5.0
    layers: int | None = None           # DARTS: cells in all (the stem replaces the first); NB201: cells per stage
    channels: int | None = None
    train_portion: float = 0.5          # of the store's train split: candidate training; the rest: validation
    limit: int | None = None            # first N samples of the train split only
    parallel: int | None = None         # candidates trained at once, in lock-step
    pool: int = 100                     # predictor: children ranked per cycle
    pretrain_archs: int = 4096          # predictor: sampled architectures for the unsupervised pre-training
    pretrain_steps: int = 500
    fit_steps: int = 200                # predictor: ranking-loss steps per fit
    hidden: int = 32                    # predictor: width of the graph network
    cv_folds: int = 5                   # predictor: folds of the held-out Kendall tau (0: none)
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    stop_after: int | None = None       # stop once this many candidates are trained in all (continue: resume)
    on_the_fly: bool = False            # train candidates on augmented images through the frozen stem
    dataset: str | None = None          # images for on_the_fly (default: the store's data set)
    data_root: str | None = None
    workers: int = 2
    progress: bool = True


def resolve_config(cfg: EvolveConfig) -> EvolveConfig:
    """A copy of ``cfg`` with the proxy size filled in and every value checked (one-line KtnasError)."""
    cfg = dataclasses.replace(cfg)
    get_space(cfg.space)
    if cfg.algo not in ALGOS:
        raise KtnasError(f"unknown --algo {cfg.algo!r}: use one of {', '.join(ALGOS)}")
    if not cfg.features:
        raise KtnasError("no feature store given: pass --features STORE (made by ktnas precompute-features)")
    for name in ("population", "sample", "epochs_per_candidate", "batch_size", "pool", "pretrain_archs",
                 "pretrain_steps", "fit_steps", "hidden", "workers"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KtnasError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    for name, low in (("cycles", 0), ("cv_folds", 0), ("parallel", 1), ("stop_after", 1), ("limit", 2),
                      ("layers", 1), ("channels", 1)):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise KtnasError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
    if cfg.algo != "random" and cfg.sample > cfg.population:
        raise KtnasError(f"--sample {cfg.sample} exceeds --population {cfg.population}: a tournament draws from the "
                         "population, pass --sample <= --population")
    if cfg.algo == "predictor" and cfg.population < 2:
        raise KtnasError("--algo predictor learns from pairs of candidates: pass --population 2 or more")
    if cfg.cv_folds == 1:
        raise KtnasError("--cv-folds 1 leaves nothing to fit on: pass 0 (no held-out tau) or 2 or more")
    if cfg.parallel is not None and cfg.algo == "predictor" and cfg.parallel > cfg.pool:
        raise KtnasError(f"--parallel {cfg.parallel} exceeds --pool {cfg.pool}: the predictor picks the candidates "
                         "of a cycle from its pool, pass --pool >= --parallel")
    if not 0 < cfg.train_portion < 1:
        raise KtnasError(f"--train-portion must lie strictly between 0 and 1, got {cfg.train_portion}")
    for name in ("lr", "momentum", "weight_decay", "grad_clip"):
        v = getattr(cfg, name)
        positive = name in ("lr", "grad_clip")
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            kind = "positive" if positive else "non-negative"
            raise KtnasError(f"--{name.replace('_', '-')} must be a {kind} number, got {v}")
    for k, v in PROXY[cfg.space].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    return cfg


def _seed(*key) -> int:
    """A 63-bit seed from a tuple of non-negative integers."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _key(g) -> str:
    return json.dumps(g.to_json(), sort_keys=True)


# ----------------------------------------------------------------------------------------------- mutation
def mutate(genotype, rng: np.random.Generator):
    """A child of ``genotype`` differing in one place: (child, description).

    NAS-Bench-201: one edge's op replaced by another op. DARTS (AmoebaNet's mutations, each with probability 1/2):
    in the normal or the reduction cell, one op replaced by another non-'none' op, or one input of a node
    replaced by another earlier state (the node's two inputs stay distinct; the pair is kept sorted by input)."""
    if isinstance(genotype, NB201Genotype):
        edges = [list(node) for node in genotype.edges]
        slots = [(j, p) for j, node in enumerate(edges) for p in range(len(node))]
        j, p = slots[rng.integers(len(slots))]
        op, src = edges[j][p]
        others = [o for o in NB201_OPS if o != op]
        new = others[rng.integers(len(others))]
        edges[j][p] = (new, src)
        return NB201Genotype(edges), f"edge {src}->{j + 1}: {op} -> {new}"
    cell = ("normal", "reduce")[rng.integers(2)]
    gene = list(getattr(genotype, cell))
    if rng.random() < 0.5 or len(gene) < 4:
        k = int(rng.integers(len(gene)))
        op, idx = gene[k]
        others = [o for o in DARTS_OPS if o not in ("none", op)]
        new = others[rng.integers(len(others))]
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


# ---------------------------------------------------------------------------------------- the cell as a graph
def _types(space: str) -> tuple[str, ...]:
    ops = NB201_OPS if space == "nb201" else DARTS_OPS
    return ("in0", "out", *ops) if space == "nb201" else ("in0", "in1", "out", *ops)


def arch_graph(genotype) -> tuple[torch.Tensor, torch.Tensor]:
    """The genotype's cells as DAGs with the ops as nodes: (node types [cells, n] int64, adjacency [cells, n, n],
    ``adj[dst, src] = 1``). NAS-Bench-201: 1 cell of 8 nodes (input, the 6 edges' ops in edge order, output);
    DARTS: the normal and the reduction cell, 11 nodes each (the 2 inputs, the 8 (op, input) pairs, output).
    An op node reads the nodes that make its input state (a cell input, or the op nodes summed into that
    intermediate node); the output reads the op nodes of the last node (NB201) or of the concatenated nodes."""
    if isinstance(genotype, NB201Genotype):
        T = _types("nb201")
        steps = len(genotype.edges)
        edge_list = [(j, i) for j in range(1, steps + 1) for i in range(j)]
        pos = {e: 1 + k for k, e in enumerate(edge_list)}
        ops = {(j, src): op for j, node in enumerate(genotype.edges, 1) for op, src in node}
        n = len(edge_list) + 2
        types = [T.index("in0")] + [T.index(ops[e]) for e in edge_list] + [T.index("out")]
        links = []
        for j, i in edge_list:
            links += [(pos[(j, i)], 0)] if i == 0 else [(pos[(j, i)], pos[(i, s)]) for s in range(i)]
        links += [(n - 1, pos[(steps, i)]) for i in range(steps)]
        cells = [(types, links, n)]
    else:
        T = _types("darts")
        cells = []
        for gene, concat in ((genotype.normal, genotype.normal_concat), (genotype.reduce, genotype.reduce_concat)):
            n = len(gene) + 3
            types = [T.index("in0"), T.index("in1")] + [T.index(op) for op, _ in gene] + [T.index("out")]
            links = []
            for k, (_, idx) in enumerate(gene):
                links += [(2 + k, idx)] if idx < 2 else [(2 + k, 2 + 2 * (idx - 2)), (2 + k, 3 + 2 * (idx - 2))]
            links += [(n - 1, 2 + 2 * (c - 2) + s) for c in concat for s in (0, 1)]
            cells.append((types, links, n))
    n = max(c[2] for c in cells)
    types = torch.full((len(cells), n), T.index("out"), dtype=torch.int64)
    adj = torch.zeros(len(cells), n, n)
    for c, (t, links, m) in enumerate(cells):
        types[c, :m] = torch.tensor(t)
        for dst, src in links:
            adj[c, dst, src] = 1.0
    return types, adj


def _batch_graphs(genotypes) -> tuple[torch.Tensor, torch.Tensor]:
    graphs = [arch_graph(g) for g in genotypes]
    return torch.stack([t for t, _ in graphs]), torch.stack([a for _, a in graphs])


# ------------------------------------------------------------------------------------------------ predictor
class ArchPredictor(nn.Module):
    """A graph network over the cell DAGs: node embeddings from the op types, ``depth`` rounds of messages along
    and against the edges (``h <- LayerNorm(h + MLP([h, A h, A^T h]))``), per cell the mean of the nodes and the
    output node's embedding, concatenated over cells, then an MLP to one score (higher: better). The type and
    adjacency decoders serve the unsupervised pre-training only."""

    def __init__(self, space: str, hidden: int = 32, depth: int = 3):
        super().__init__()
        self.space, self.hidden = space, hidden
        self.num_types = len(_types(space))
        cells = 1 if space == "nb201" else 2
        self.embed = nn.Embedding(self.num_types + 1, hidden)  # the last type is the mask token
        self.rounds = nn.ModuleList(nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
                                    for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth))
        self.head = nn.Sequential(nn.Linear(2 * hidden * cells, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.type_decoder = nn.Linear(hidden, self.num_types)
        self.src_proj, self.dst_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def nodes(self, types: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = self.embed(types)
        for mlp, norm in zip(self.rounds, self.norms):
            h = norm(h + mlp(torch.cat([h, adj @ h, adj.transpose(-1, -2) @ h], -1)))
        return h

    def embedding(self, types, adj) -> torch.Tensor:
        h = self.nodes(types, adj)
        out = (types == _types(self.space).index("out")).float().unsqueeze(-1)
        out_h = (h * out).sum(-2) / out.sum(-2).clamp_min(1)
        return torch.cat([h.mean(-2), out_h], -1).flatten(1)

    def forward(self, types, adj) -> torch.Tensor:
        return self.head(self.embedding(types, adj)).squeeze(-1)


def _init_predictor(space: str, hidden: int, seed: int) -> ArchPredictor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ArchPredictor(space, hidden)


def pretrain_predictor(space: str, *, archs: int = 4096, steps: int = 500, hidden: int = 32, seed: int = 0,
                       batch_size: int = 128, mask_prob: float = 0.3, progress: bool = False) -> dict:
    """Pre-train the encoder without labels (a masked graph autoencoder) on ``archs`` uniformly sampled
    architectures: op nodes are masked with probability ``mask_prob`` and the network reconstructs their ops
    (cross-entropy) and the adjacency of the cells (binary cross-entropy of ``dst_proj(h_i) . src_proj(h_j)``).
    Returns the state dict (CPU; deterministic in ``seed``)."""
    space_ = get_space(space)
    rng = np.random.default_rng([seed, _TAG_PRETRAIN])
    types, adj = _batch_graphs([random_genotype(space_, rng) for _ in range(archs)])
    model = _init_predictor(space, hidden, _seed(seed, _TAG_PRETRAIN))
    T = _types(space)
    maskable = types >= T.index("out") + 1  # op nodes, never the inputs or the output
    gen = torch.Generator().manual_seed(_seed(seed, _TAG_PRETRAIN, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    eye = torch.eye(adj.shape[-1], dtype=torch.bool)
    bar = tqdm(range(steps), desc="predictor pre-training", leave=False, disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(archs, (min(batch_size, archs),), generator=gen)
        t, a = types[idx], adj[idx]
        mask = maskable[idx] & (torch.rand(t.shape, generator=gen) < mask_prob)
        h = model.nodes(torch.where(mask, model.num_types, t), a)
        loss_type = F.cross_entropy(model.type_decoder(h[mask]), t[mask]) if mask.any() else h.sum() * 0
        logits = model.dst_proj(h) @ model.src_proj(h).transpose(-1, -2) / math.sqrt(model.hidden)
        loss_adj = F.binary_cross_entropy_with_logits(logits[..., ~eye], a[..., ~eye])
        loss = loss_type + loss_adj
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            bar.set_postfix(ops=f"{float(loss_type.detach()):.3f}", adj=f"{float(loss_adj.detach()):.3f}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit_ranker(pretrained: dict, space: str, genotypes, accuracies, *, steps: int = 200, hidden: int = 32,
               seed: int = 0, margin: float = 0.1, lr: float = 1e-3) -> ArchPredictor:
    """The pre-trained predictor fine-tuned (encoder and a freshly initialised head) to rank ``genotypes`` by
    ``accuracies``: pairwise margin ranking loss, mean over every pair (i, j) with acc_i > acc_j of
    max(0, margin - (s_i - s_j)); full batch, Adam. Deterministic in ``seed``."""
    model = _init_predictor(space, hidden, _seed(seed))
    state = dict(model.state_dict())
    state.update({k: v for k, v in pretrained.items() if not k.startswith("head.")})
    model.load_state_dict(state)
    types, adj = _batch_graphs(genotypes)
    acc = torch.as_tensor(np.asarray(accuracies, dtype=np.float64))
    better = acc[:, None] > acc[None, :]  # better[i, j]: i beat j
    if not better.any():
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        s = model(types, adj)
        loss = F.relu(margin - (s[:, None] - s[None, :]))[better].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict_scores(model: ArchPredictor, genotypes, batch_size: int = 1024) -> np.ndarray:
    """The predictor's scores (higher: predicted better) of ``genotypes``."""
    out = []
    for a in range(0, len(genotypes), batch_size):
        out.append(model(*_batch_graphs(genotypes[a:a + batch_size])).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def kendall_tau(x, y) -> float:
    """Kendall's tau-b of two sequences (ties handled as scipy.stats.kendalltau does); nan when undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise KtnasError(f"kendall_tau needs two sequences of the same length, got shapes {x.shape} and {y.shape}")
    iu = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[:, None] - x[None, :])[iu], np.sign(y[:, None] - y[None, :])[iu]
    denom = math.sqrt(float(np.count_nonzero(dx)) * float(np.count_nonzero(dy)))
    return float((dx * dy).sum() / denom) if denom else float("nan")


def heldout_tau(pretrained: dict, space: str, history: list[dict], *, folds: int = 5, steps: int = 200,
                hidden: int = 32, seed: int = 0) -> dict | None:
    """How well the predictor ranks candidates it was not fitted on: the evaluated candidates are split into
    ``folds`` folds (permutation seeded by ``seed``); for each, the predictor is fitted (:func:`fit_ranker`) on the
    other folds and Kendall's tau-b between its scores and the measured validation accuracies is taken on the
    held-out fold. Returns the mean, its standard error, the per-fold values and sizes (None: fewer than 3
    candidates per fold)."""
    n = len(history)
    if folds < 2 or n < 3 * folds:
        return None
    perm = np.random.default_rng([seed, _TAG_CV]).permutation(n)
    genotypes = [genotype_from_json(r["genotype"]) for r in history]
    acc = np.array([r["val_acc"] for r in history], dtype=np.float64)
    taus, sizes = [], []
    for f, test in enumerate(np.array_split(perm, folds)):
        fit = np.setdiff1d(perm, test)
        model = fit_ranker(pretrained, space, [genotypes[i] for i in fit], acc[fit], steps=steps, hidden=hidden,
                           seed=_seed(seed, _TAG_CV, f))
        taus.append(kendall_tau(predict_scores(model, [genotypes[i] for i in test]), acc[test]))
        sizes.append(len(test))
    t = np.array([v for v in taus if math.isfinite(v)])
    return dict(kendall_tau=float(t.mean()) if len(t) else float("nan"),
                stderr=float(t.std(ddof=1) / math.sqrt(len(t))) if len(t) > 1 else float("nan"),
                folds=[None if not math.isfinite(v) else v for v in taus], fold_sizes=sizes, candidates=n,
                method=f"{folds}-fold cross-validation over the evaluated candidates: fitted on the other folds "
                       "(from the pre-trained encoder), Kendall tau-b of its scores against the measured validation "
                       "accuracy on the held-out fold; mean over folds")


# ------------------------------------------------------------------------------------------ the candidates
class CandidateTrainer:
    """Trains candidate networks on the search-train part of a store's train split and measures them on its
    search-validation part; :meth:`train` takes a group and runs it in lock-step (see the module docstring)."""

    def __init__(self, cfg: EvolveConfig, store, device):
        from ktnas.cache.stream import FeatureLoader

        self.cfg, self.device = cfg, torch.device(device)
        attrs = store.attrs
        sp = store.split("train")
        n = sp.shape[0] if cfg.limit is None else min(cfg.limit, sp.shape[0])
        if n < 2:
            raise KtnasError(f"store {store.path} has {n} training sample(s): evolve needs 2 or more (one to train "
                             "on, one to validate on)")
        tr, va = _split_indices(n, cfg)
        C, H, W = (int(v) for v in sp.shape[2:])
        self.shape = (C, H, W)
        self.network_config = dict(num_classes=int(attrs["num_classes"]), layers=cfg.layers, channels=cfg.channels,
                                   in_channels=C, in_size=H)
        self.data = dict(train=len(tr), val=len(va), shape=[C, H, W], stem=attrs.get("stem"),
                         fingerprint=attrs.get("stem_fingerprint"), dataset=attrs.get("dataset"),
                         source="images through the frozen stem" if cfg.on_the_fly else "cached features")
        val_batch = max(cfg.batch_size, 256)  # measuring in eval mode: the batch size only sets the speed
        if cfg.on_the_fly:
            from .train import ImageBatches, stem_images, stem_of_store

            stem = stem_of_store(attrs, store.path).to(self.device)
            images = stem_images(store, stem, "train", cfg.dataset, cfg.data_root)
            self.train_batches = ImageBatches(images, 0, stem, cfg.batch_size, self.device, True, cfg.seed, tr)
            self.val_batches = ImageBatches(images, 0, stem, val_batch, self.device, False, cfg.seed, va)
        else:
            kw = dict(device=self.device, seed=cfg.seed, workers=cfg.workers)
            self.train_batches = FeatureLoader(store, "train", batch_size=cfg.batch_size, shuffle=True, view="random",
                                               indices=tr, **kw)
            self.val_batches = FeatureLoader(store, "train", batch_size=val_batch, shuffle=False, view=0, indices=va,
                                             **kw)
        self.tcfg = TrainConfig(features="", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                grad_clip=cfg.grad_clip, epochs=cfg.epochs_per_candidate, batch_size=cfg.batch_size,
                                auxiliary=False, drop_path=0.0, seed=cfg.seed)

    def build(self, genotype, index: int) -> nn.Module:
        """Candidate ``index``'s network, its initial weights drawn from a seed of (seed, index)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.cfg.seed, index, _TAG_INIT))
            return build_network(genotype, **self.network_config).to(self.device)

    @torch.no_grad()
    def flops(self, net: nn.Module) -> int:
        """Forward FLOPs of one sample (a multiply-add counts 2), as counted by torch's FlopCounterMode."""
        from torch.utils.flop_counter import FlopCounterMode

        net.eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, *self.shape, device=self.device))
        return int(counter.get_total_flops())

    def train(self, genotypes, indices) -> list[dict]:
        """Train the candidates ``genotypes`` (numbered ``indices``) together; one result dict per candidate."""
        nets = [self.build(g, i) for g, i in zip(genotypes, indices)]
        flops = [self.flops(net) for net in nets]
        t0 = time.perf_counter()
        steps = self.cfg.epochs_per_candidate * len(self.train_batches)
        optimizers, schedulers = zip(*(make_optimizer(net, self.tcfg, steps) for net in nets))
        streams = [torch.cuda.Stream(self.device) for _ in nets] \
            if self.device.type == "cuda" and len(nets) > 1 else None
        for epoch in range(self.cfg.epochs_per_candidate):
            self.train_batches.set_epoch(epoch)
            train = run_epoch(nets, self.train_batches, self.device, list(optimizers), self.tcfg,
                              schedulers=list(schedulers), streams=streams, check_finite=False)
        val = run_epoch(nets, self.val_batches, self.device, streams=streams)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        rows = []
        for i, g, net, f, (tl, ta), (vl, vacc) in zip(indices, genotypes, nets, flops, train, val):
            rows.append(dict(index=int(i), arch=genotype_str(g), genotype=g.to_json(), val_acc=vacc,
                             val_loss=vl if math.isfinite(vl) else None, train_acc=ta,
                             train_loss=tl if math.isfinite(tl) else None, diverged=not math.isfinite(tl),
                             params=sum(p.numel() for p in net.parameters()), flops=f,
                             seconds=seconds / len(nets), group_seconds=seconds, group_size=len(nets)))
        return rows

    def close(self):
        for b in (self.train_batches, self.val_batches):
            getattr(b, "close", lambda: None)()


# ------------------------------------------------------------------------------------------------ the search
def _rank_key(r: dict):
    """Best first: higher validation accuracy, then lower validation loss, then earlier."""
    loss = r["val_loss"] if r["val_loss"] is not None else math.inf
    return (-r["val_acc"], loss, r["index"])


def best_of(history: list[dict]) -> dict | None:
    return min(history, key=_rank_key) if history else None


def _tournament(population: list[dict], sample: int, rng: np.random.Generator) -> dict:
    """Real et al.'s tournament: ``sample`` members drawn with replacement, the most accurate wins (the first
    drawn on ties)."""
    drawn = [population[i] for i in rng.integers(len(population), size=sample)]
    return max(drawn, key=lambda r: r["val_acc"])


class _Evolution:
    def __init__(self, cfg: EvolveConfig, store, device, state: dict | None):
        self.cfg, self.device, self.space = cfg, device, get_space(cfg.space)
        self.out = Path(cfg.out)
        self.history: list[dict] = list(state["history"]) if state else []
        self.pretrained = state.get("pretrained") if state else None
        self.tau = state.get("tau") if state else None
        self.seconds_total = float(state.get("seconds_total", 0.0)) if state else 0.0
        if state is not None:
            set_rng_state(state["rng"])
        self.trainer = CandidateTrainer(cfg, store, device)

    @property
    def budget(self) -> int:
        return self.cfg.population + self.cfg.cycles

    # ------------------------------------------------------------------------------------------ proposals
    def propose(self, k: int, rng: np.random.Generator) -> list[tuple[object, dict]]:
        """The next group of ``k`` genotypes, with what made them."""
        cfg, history = self.cfg, self.history
        if len(history) < cfg.population or cfg.algo == "random":
            return [(random_genotype(self.space, rng), dict(origin="random")) for _ in range(k)]
        population = history[-cfg.population:]
        if cfg.algo == "rea":
            out = []
            for _ in range(k):
                parent = _tournament(population, cfg.sample, rng)
                child, what = mutate(genotype_from_json(parent["genotype"]), rng)
                out.append((child, dict(origin="mutation", parent=parent["index"], mutation=what)))
            return out
        return self._propose_predicted(k, rng, population)

    def _propose_predicted(self, k, rng, population):
        cfg, history = self.cfg, self.history
        seen = {_key(genotype_from_json(r["genotype"])) for r in history}
        pool, metas, attempts = [], [], 0
        while len(pool) < cfg.pool and attempts < 20 * cfg.pool:
            attempts += 1
            parent = _tournament(population, cfg.sample, rng)
            child, what = mutate(genotype_from_json(parent["genotype"]), rng)
            if _key(child) not in seen:
                seen.add(_key(child))
                pool.append(child)
                metas.append(dict(origin="predictor", parent=parent["index"], mutation=what))
        while len(pool) < k:  # the neighbourhoods are exhausted: fill with unseen random architectures
            child = random_genotype(self.space, rng)
            if _key(child) not in seen or attempts > 1000 * cfg.pool:
                seen.add(_key(child))
                pool.append(child)
                metas.append(dict(origin="predictor-random"))
            attempts += 1
        model = fit_ranker(self.pretrained, cfg.space, [genotype_from_json(r["genotype"]) for r in history],
                           [r["val_acc"] for r in history], steps=cfg.fit_steps, hidden=cfg.hidden,
                           seed=_seed(cfg.seed, len(history)))
        scores = predict_scores(model, pool)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(pool[i], dict(metas[i], predicted=float(scores[i]), predicted_rank=r + 1, pool=len(pool)))
                for r, i in enumerate(order)]

    # ------------------------------------------------------------------------------------------------ files
    def summary(self) -> dict:
        h, cfg = self.history, self.cfg
        best = best_of(h)
        curve = list(np.maximum.accumulate([r["val_acc"] for r in h])) if h else []
        train_s = sum(r["seconds"] for r in h)
        initial = h[:cfg.population]
        return dict(
            out=str(self.out), algo=cfg.algo, space=cfg.space, candidates=len(h), budget=self.budget,
            complete=len(h) >= self.budget,
            best=None if best is None else {k: best[k] for k in ("index", "arch", "val_acc", "val_loss", "params",
                                                                 "flops", "origin")},
            genotype=None if best is None else best["genotype"],
            initial_best_acc=max(r["val_acc"] for r in initial) if initial else None,
            best_so_far=[float(v) for v in curve], seconds_training=train_s, seconds_total=self.seconds_total,
            candidates_per_hour=3600 * len(h) / train_s if train_s > 0 else None,
            candidates_per_hour_total=3600 * len(h) / self.seconds_total if self.seconds_total > 0 else None,
            data=self.trainer.data, predictor=self.tau,
            machine=dict(node=platform.node(), processor=platform.processor() or platform.machine(),
                         cpus=os.cpu_count(), threads=torch.get_num_threads(), device=str(self.device),
                         gpu=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                         torch=torch.__version__),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    def write(self, picture: bool) -> dict:
        out, h = self.out, self.history
        s = self.summary()
        atomic_write_jsonl(out / "candidates.jsonl", h)
        if s["genotype"] is not None:
            atomic_write_text(out / "genotype.json", json.dumps(s["genotype"], indent=1) + "\n")
        atomic_write_text(out / "results.json", json.dumps(s, indent=1) + "\n")
        if picture and h:
            plot_accuracy({self.cfg.algo: h}, out / "accuracy.png", population=self.cfg.population,
                          title=f"ktnas evolve --algo {self.cfg.algo} --space {self.cfg.space}")
        return s

    def checkpoint(self):
        atomic_save(dict(history=self.history, pretrained=self.pretrained, tau=self.tau, rng=rng_state(),
                         seconds_total=self.seconds_total, config=asdict(self.cfg)), self.out / "checkpoint.pt")

    # ------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        cfg, out = self.cfg, self.out
        t_session = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        if cfg.algo == "predictor" and self.pretrained is None:
            self.pretrained = pretrain_predictor(cfg.space, archs=cfg.pretrain_archs, steps=cfg.pretrain_steps,
                                                 hidden=cfg.hidden, seed=cfg.seed, progress=cfg.progress)
        resolved = dict(asdict(cfg), network_config=self.trainer.network_config, data=self.trainer.data,
                        budget=self.budget, device_resolved=str(self.device))
        atomic_write_text(out / "config.json", json.dumps(resolved, indent=1) + "\n")
        end = self.budget if cfg.stop_after is None else min(self.budget, cfg.stop_after)
        bar = tqdm(total=self.budget, initial=min(len(self.history), self.budget), desc=f"evolve {cfg.algo}",
                   unit="cand", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
        groups = 0
        try:
            while len(self.history) < end:
                start = len(self.history)
                limit = cfg.population if start < cfg.population else self.budget
                k = min(cfg.parallel, limit - start)
                rng = np.random.default_rng([cfg.seed, start])
                proposals = self.propose(k, rng)
                rows = self.trainer.train([g for g, _ in proposals], range(start, start + k))
                for row, (_, meta) in zip(rows, proposals):
                    row.update(dict(origin=None, parent=None, mutation=None, predicted=None), **meta)
                self.history += rows
                done = len(self.history) >= end
                if done and cfg.algo == "predictor" and len(self.history) >= self.budget and cfg.cv_folds:
                    self.tau = heldout_tau(self.pretrained, cfg.space, self.history, folds=cfg.cv_folds,
                                           steps=cfg.fit_steps, hidden=cfg.hidden, seed=cfg.seed)
                self.seconds_total += time.perf_counter() - t_session
                t_session = time.perf_counter()
                groups += 1
                self.write(picture=done or groups % 10 == 0)
                self.checkpoint()
                best = best_of(self.history)
                bar.update(k)
                bar.set_postfix(best=f"{best['val_acc']:.2f}", last=f"{rows[-1]['val_acc']:.2f}")
        finally:
            bar.close()
            self.trainer.close()
        if groups == 0:  # nothing left to do (a finished or stopped run resumed): refresh the files
            self.write(picture=bool(self.history))
            if not (out / "checkpoint.pt").exists():
                self.checkpoint()
        return self.summary()


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = first_line(e)
        raise KtnasError(f"cannot resume from {path} ({type(e).__name__}: {reason}): start afresh in another "
                         "--out") from None


def evolve(cfg: EvolveConfig | None = None, **overrides) -> dict:
    """Run the configured sample-based search (see the module docstring); returns the summary that
    ``results.json`` holds: best candidate and genotype, best-so-far curve, candidates per hour, predictor tau."""
    from ktnas.cache.store import open_store

    cfg = resolve_config(dataclasses.replace(cfg or EvolveConfig(), **overrides))
    out = Path(cfg.out)
    ckpt = out / "checkpoint.pt"
    state = None
    if ckpt.exists():
        if not cfg.resume:
            raise KtnasError(f"{out} already holds an evolve run (checkpoint.pt): pass --resume to continue it, or "
                             "another --out")
        state = _read_checkpoint(ckpt)
        old = state.get("config", {})
        if cfg.parallel is None:
            cfg.parallel = old.get("parallel")
        diff = [k for k in old if k not in _NOT_COMPARED and k in asdict(cfg) and old[k] != getattr(cfg, k)]
        if diff:
            k = diff[0]
            raise KtnasError(f"{out} was run with --{k.replace('_', '-')} {old[k]}, not {getattr(cfg, k)}: resume "
                             "with the run's own arguments, or start afresh in another --out")
    device = resolve_device(cfg.device)
    if cfg.parallel is None:
        cfg.parallel = 8 if device.type == "cuda" else 1
    store = open_store(cfg.features)
    try:
        return _Evolution(cfg, store, device, state).run()
    finally:
        store.close()


# ------------------------------------------------------------------------------------------------- picture
def plot_accuracy(runs: dict[str, list[dict]], path, population: int | None = None, title: str = "") -> None:
    """Validation accuracy of every evaluated candidate (points) and the best so far (line) over the candidates
    trained, one colour per run (e.g. per algorithm); a dotted line where the initial population ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, (label, h) in enumerate(runs.items()):
        x = np.arange(1, len(h) + 1)
        acc = np.array([r["val_acc"] for r in h])
        ax.scatter(x, acc, s=10, color=f"C{c}", alpha=0.45)
        ax.step(x, np.maximum.accumulate(acc), where="post", color=f"C{c}", lw=2,
                label=f"{label}: best {acc.max():.2f}%")
    if population:
        ax.axvline(population + 0.5, color="grey", ls=":", lw=1, label="end of the initial population")
    ax.set_xlabel("candidates trained")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- CLI
def cmd_evolve(args) -> int:
    """``ktnas evolve``: map the flags onto an EvolveConfig and run :func:`evolve`."""
    fields = {f.name for f in dataclasses.fields(EvolveConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    kw["progress"] = not args.quiet
    s = evolve(EvolveConfig(**kw))
    b = s["best"] or {}
    rate = f", {s['candidates_per_hour']:.0f} candidates/hour" if s["candidates_per_hour"] else ""
    tau = s["predictor"]
    tau = f"; predictor held-out Kendall tau {tau['kendall_tau']:.3f} +- {tau['stderr']:.3f}" if tau else ""
    state = f"genotype {s['out']}/genotype.json" if s["complete"] else \
        f"stopped after {s['candidates']}/{s['budget']} candidates: continue with --resume"
    print(f"{s['out']}: {s['candidates']} candidates ({s['algo']}, {s['space']}), best validation accuracy "
          f"{b.get('val_acc', float('nan')):.2f}% (#{b.get('index')}: {b.get('arch')}){rate}{tau}; {state}")
    return 0


def add_evolve_parser(subparsers):
    """Add the ``evolve`` subcommand (``func=cmd_evolve``) to an argparse subparsers object."""
    d = EvolveConfig()
    s = subparsers.add_parser("evolve", help="sample-based search (random, regularized evolution, predictor-guided): "
                                             "every candidate trained on cached features",
                              description="Evolutionary and predictor-guided search on a feature store: each "
                                          "candidate network is trained for real, at the cost of its cells alone.")
    s.add_argument("--features", default=d.features, help="feature store (default: %(default)s)")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--space", default=d.space, choices=("nb201", "darts"), help="(default: %(default)s)")
    s.add_argument("--algo", default=d.algo, choices=ALGOS, help="(default: %(default)s)")
    s.add_argument("--population", type=int, default=d.population,
                   help="P: initial random candidates and the aging population's size (default: %(default)s)")
    s.add_argument("--sample", type=int, default=d.sample, help="S: tournament size (default: %(default)s)")
    s.add_argument("--cycles", type=int, default=d.cycles,
                   help="candidates trained after the initial population; budget P + N (default: %(default)s)")
    s.add_argument("--epochs-per-candidate", type=int, default=d.epochs_per_candidate, help="(default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    s.add_argument("--lr", type=float, default=d.lr, help="cosine to 0 over a candidate's steps (default: %(default)s)")
    s.add_argument("--momentum", type=float, default=d.momentum)
    s.add_argument("--weight-decay", type=float, default=d.weight_decay)
    s.add_argument("--grad-clip", type=float, default=d.grad_clip)
    s.add_argument("--layers", type=int, help="candidate size: DARTS cells in all (8), NB201 cells per stage (2)")
    s.add_argument("--channels", type=int, help="candidate size: first width of the full network (16)")
    s.add_argument("--train-portion", type=float, default=d.train_portion,
                   help="of the train split for candidate training, the rest validates (default: %(default)s)")
    s.add_argument("--limit", type=int, help="first N samples of the train split only")
    s.add_argument("--parallel", type=int, help="candidates trained at once in lock-step (default: 1 on CPU, 8 on "
                                                "CUDA); the predictor trains this many per cycle")
    s.add_argument("--pool", type=int, default=d.pool, help="predictor: children ranked per cycle (default: "
                                                             "%(default)s)")
    s.add_argument("--pretrain-archs", type=int, default=d.pretrain_archs,
                   help="predictor: sampled architectures of the unsupervised pre-training (default: %(default)s)")
    s.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="(default: %(default)s)")
    s.add_argument("--fit-steps", type=int, default=d.fit_steps, help="predictor: ranking-loss steps per fit")
    s.add_argument("--hidden", type=int, default=d.hidden, help="predictor: graph network width")
    s.add_argument("--cv-folds", type=int, default=d.cv_folds,
                   help="predictor: folds of the held-out Kendall tau at the end (0: none; default: %(default)s)")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    s.add_argument("--resume", action="store_true", help="continue the run in --out (a larger --cycles extends it)")
    s.add_argument("--stop-after", type=int, help="stop once this many candidates are trained (continue: --resume)")
    s.add_argument("--on-the-fly", action="store_true",
                   help="train candidates on augmented images through the frozen stem instead of cached features")
    s.add_argument("--dataset", help="images for --on-the-fly (default: the store's data set)")
    s.add_argument("--data-root", help="folder with the data set's files")
    s.add_argument("--workers", type=int, default=d.workers, help="feature reader threads")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_evolve)
    return s
