"""The seed method's predictor (DCL-ENAS: evolutionary NAS with dual contrastive learning): the same graph
encoder as :mod:`ktnas.engine.evolve.predictor`'s (:class:`ArchPredictor`, so the two compare like for like), trained by
two contrastive stages instead of a masked autoencoder and a margin loss:

1. **Self-supervised pre-training** on unlabelled, uniformly sampled architectures: each is seen through two
   random augmentations of its cell graphs (op nodes replaced by the mask token with probability
   ``mask_prob``, edges dropped with probability ``drop_prob``); a projection head maps the encoder's
   embedding to a unit vector and the NT-Xent loss (InfoNCE, temperature ``temperature``) makes the two views
   of one architecture each other's positive and the other 2B-2 views of the batch its negatives.
2. **Contrastive fine-tuning on relative performance**: with the measured candidates, each candidate is the
   positive against every candidate measured worse than it: ``-log(exp(s_i / t) / (exp(s_i / t) +
   sum_{j: acc_j < acc_i} exp(s_j / t)))``, averaged over the candidates that beat at least one other (a
   listwise InfoNCE over the ranking, where the margin loss looks at pairs one at a time).

Only the scores' order is used (higher: predicted better), as with the autoencoder predictor.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ktnas.engine import runs
from ktnas.engine.evolve.predictor import TAG_PRETRAIN, ArchPredictor, batch_graphs, derive_seed, init_predictor
from ktnas.engine.spaces import get_space

TAG_DCL = 4  # seed-sequence tag of the contrastive pre-training's augmentations


def augment(types, adj, maskable, mask_token: int, gen, mask_prob: float, drop_prob: float):
    """One random view of a batch of cell graphs: op nodes masked, edges dropped."""
    mask = maskable & (torch.rand(types.shape, generator=gen) < mask_prob)
    keep = (torch.rand(adj.shape, generator=gen) >= drop_prob).to(adj.dtype)
    return torch.where(mask, mask_token, types), adj * keep


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of two batches of views (row i of ``z1`` and of ``z2``: the same architecture)."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.T / temperature
    n = len(z1)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def pretrain_dcl(space: str, *, archs: int = 4096, steps: int = 500, hidden: int = 32, seed: int = 0,
                 batch_size: int = 128, temperature: float = 0.1, mask_prob: float = 0.2, drop_prob: float = 0.1,
                 progress: bool = False, losses: list | None = None) -> dict:
    """Stage 1 (see the module docstring) on ``archs`` sampled architectures; returns the encoder's state dict
    (CPU, the keys of :class:`ArchPredictor`; deterministic in ``seed``). Each step's loss is appended to
    ``losses`` when given."""
    space_ = get_space(space)
    rng = np.random.default_rng([seed, TAG_PRETRAIN])
    types, adj = batch_graphs([space_.random_genotype(rng) for _ in range(archs)])
    model = init_predictor(space, hidden, derive_seed(seed, TAG_PRETRAIN))
    T = space_.node_types()
    maskable = types >= T.index("out") + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, TAG_DCL))
        proj = nn.Sequential(nn.Linear(2 * hidden * len(space_.cell_types), hidden), nn.ReLU(),
                             nn.Linear(hidden, hidden))
    gen = torch.Generator().manual_seed(derive_seed(seed, TAG_DCL, 1))
    opt = torch.optim.Adam([*model.parameters(), *proj.parameters()], 1e-3)
    bar = runs.progress(range(steps), desc="predictor pre-training (contrastive)", leave=False, enabled=progress)
    for _ in bar:
        idx = torch.randint(archs, (min(batch_size, archs),), generator=gen)
        t, a, m = types[idx], adj[idx], maskable[idx]
        views = [augment(t, a, m, model.num_types, gen, mask_prob, drop_prob) for _ in range(2)]
        loss = nt_xent(*(proj(model.embedding(*v)) for v in views), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(float(loss.detach()))
        if progress:
            bar.set_postfix(nt_xent=f"{float(loss.detach()):.3f}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ranking_infonce(scores: torch.Tensor, acc: torch.Tensor, temperature: float) -> torch.Tensor:
    """Stage 2's loss (see the module docstring); zero when no candidate beats another."""
    worse = acc[None, :] < acc[:, None]  # worse[i, j]: j was measured worse than i
    has = worse.any(1)
    if not has.any():
        return scores.sum() * 0
    logits = (scores / temperature)[None, :].expand(len(scores), -1)
    logits = logits.masked_fill(~(worse | torch.eye(len(scores), dtype=torch.bool)), float("-inf"))
    return -(scores / temperature - torch.logsumexp(logits, 1))[has].mean()


def fit_dcl(pretrained: dict, space: str, genotypes, accuracies, *, steps: int = 200, hidden: int = 32,
            seed: int = 0, temperature: float = 0.1, lr: float = 1e-3) -> ArchPredictor:
    """Stage 2: the pre-trained encoder and a fresh head fine-tuned on ``genotypes``' measured ``accuracies``
    (full batch, Adam). Deterministic in ``seed``."""
    model = init_predictor(space, hidden, derive_seed(seed))
    state = dict(model.state_dict())
    state.update({k: v for k, v in pretrained.items() if not k.startswith("head.") and k in state})
    model.load_state_dict(state)
    types, adj = batch_graphs(genotypes)
    acc = torch.as_tensor(np.asarray(accuracies, dtype=np.float64))
    if not (acc[:, None] > acc[None, :]).any():
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        loss = ranking_infonce(model(types, adj), acc, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def _methods():
    from ktnas.engine.evolve.predictor import fit_ranker, pretrain_predictor

    return {"gae": (pretrain_predictor, fit_ranker), "dcl": (pretrain_dcl, fit_dcl)}


PREDICTORS = ("gae", "dcl")  # --predictor: the masked graph autoencoder + margin loss, or DCL's two contrastive stages


def predictor_method(name: str):
    """(pretrain, fit) of predictor ``name`` (one of :data:`PREDICTORS`)."""
    from ktnas.cache.errors import KtnasError

    if name not in PREDICTORS:
        raise KtnasError(f"unknown --predictor {name!r}: use one of {', '.join(PREDICTORS)}")
    return _methods()[name]
