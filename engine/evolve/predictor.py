"""The performance predictor of ``ktnas evolve``: a graph network over the cell DAGs, pre-trained without labels
(a masked graph autoencoder, after arch2vec / GraphMAE) and fine-tuned to rank architectures (pairwise margin
loss); its held-out ranking quality (Kendall tau-b by k-fold cross-validation). Knows nothing of training
candidates: it takes genotypes and their measured accuracies."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ktnas.cache.errors import KtnasError

from ktnas.engine import runs
from ktnas.engine.spaces import genotype_from_json, get_space, space_of

TAG_INIT, TAG_PRETRAIN, TAG_CV = 1, 2, 3  # seed-sequence tags: candidate weights, pre-training, CV folds


def derive_seed(*key) -> int:
    """A 63-bit seed from a tuple of non-negative integers."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def arch_graph(genotype) -> tuple[torch.Tensor, torch.Tensor]:
    """The genotype's cells as DAGs with the ops as nodes (the space's ``graph``): (node types [cells, n] int64,
    adjacency [cells, n, n], ``adj[dst, src] = 1``), cells padded to the largest with 'out' nodes."""
    space = space_of(genotype)
    T, cells = space.node_types(), space.graph(genotype)
    n = max(c[2] for c in cells)
    types = torch.full((len(cells), n), T.index("out"), dtype=torch.int64)
    adj = torch.zeros(len(cells), n, n)
    for c, (t, links, m) in enumerate(cells):
        types[c, :m] = torch.tensor(t)
        for dst, src in links:
            adj[c, dst, src] = 1.0
    return types, adj


def batch_graphs(genotypes) -> tuple[torch.Tensor, torch.Tensor]:
    graphs = [arch_graph(g) for g in genotypes]
    return torch.stack([t for t, _ in graphs]), torch.stack([a for _, a in graphs])


class ArchPredictor(nn.Module):
    """A graph network over the cell DAGs: node embeddings from the op types, ``depth`` rounds of messages along
    and against the edges (``h <- LayerNorm(h + MLP([h, A h, A^T h]))``), per cell the mean of the nodes and the
    output node's embedding, concatenated over cells, then an MLP to one score (higher: better). The type and
    adjacency decoders serve the unsupervised pre-training only."""

    def __init__(self, space: str, hidden: int = 32, depth: int = 3):
        super().__init__()
        self.space, self.hidden = space, hidden
        self.num_types = len(get_space(space).node_types())
        cells = len(get_space(space).cell_types)
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
        out = (types == get_space(self.space).node_types().index("out")).float().unsqueeze(-1)
        out_h = (h * out).sum(-2) / out.sum(-2).clamp_min(1)
        return torch.cat([h.mean(-2), out_h], -1).flatten(1)

    def forward(self, types, adj) -> torch.Tensor:
        return self.head(self.embedding(types, adj)).squeeze(-1)


def init_predictor(space: str, hidden: int, seed: int) -> ArchPredictor:
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
    rng = np.random.default_rng([seed, TAG_PRETRAIN])
    types, adj = batch_graphs([space_.random_genotype(rng) for _ in range(archs)])
    model = init_predictor(space, hidden, derive_seed(seed, TAG_PRETRAIN))
    T = get_space(space).node_types()
    maskable = types >= T.index("out") + 1  # op nodes, never the inputs or the output
    gen = torch.Generator().manual_seed(derive_seed(seed, TAG_PRETRAIN, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    eye = torch.eye(adj.shape[-1], dtype=torch.bool)
    bar = runs.progress(range(steps), desc="predictor pre-training", leave=False, enabled=progress)
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
    model = init_predictor(space, hidden, derive_seed(seed))
    state = dict(model.state_dict())
    state.update({k: v for k, v in pretrained.items() if not k.startswith("head.")})
    model.load_state_dict(state)
    types, adj = batch_graphs(genotypes)
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
        out.append(model(*batch_graphs(genotypes[a:a + batch_size])).double().numpy())
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
                hidden: int = 32, seed: int = 0, fit=None) -> dict | None:
    """How well the predictor ranks candidates it was not fitted on: the evaluated candidates are split into
    ``folds`` folds (permutation seeded by ``seed``); for each, the predictor is fitted (:func:`fit_ranker`, or
    ``fit``, another fitting function of its signature such as DCL's) on the other folds and Kendall's tau-b
    between its scores and the measured validation accuracies is taken on the held-out fold. The folds depend on
    ``seed`` only, so two predictors see the same ones. Returns the mean, its standard error, the per-fold values
    and sizes (None: fewer than 3 candidates per fold)."""
    n = len(history)
    if folds < 2 or n < 3 * folds:
        return None
    perm = np.random.default_rng([seed, TAG_CV]).permutation(n)
    genotypes = [genotype_from_json(r["genotype"]) for r in history]
    acc = np.array([r["val_acc"] for r in history], dtype=np.float64)
    taus, sizes = [], []
    for f, test in enumerate(np.array_split(perm, folds)):
        train = np.setdiff1d(perm, test)
        model = (fit or fit_ranker)(pretrained, space, [genotypes[i] for i in train], acc[train], steps=steps,
                                    hidden=hidden, seed=derive_seed(seed, TAG_CV, f))
        taus.append(kendall_tau(predict_scores(model, [genotypes[i] for i in test]), acc[test]))
        sizes.append(len(test))
    t = np.array([v for v in taus if math.isfinite(v)])
    return dict(kendall_tau=float(t.mean()) if len(t) else float("nan"),
                stderr=float(t.std(ddof=1) / math.sqrt(len(t))) if len(t) > 1 else float("nan"),
                folds=[None if not math.isfinite(v) else v for v in taus], fold_sizes=sizes, candidates=n,
                method=f"{folds}-fold cross-validation over the evaluated candidates: fitted on the other folds "
                       "(from the pre-trained encoder), Kendall tau-b of its scores against the measured validation "
                       "accuracy on the held-out fold; mean over folds")
