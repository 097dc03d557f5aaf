"""The DCL-ENAS predictor (--predictor dcl): its two contrastive losses against their definitions in float64,
pre-training that is deterministic and makes two views of one architecture alike, fine-tuning that ranks held-out
architectures, and `ktnas evolve --algo predictor --predictor dcl` end to end."""
import math

import numpy as np
import pytest
import torch

from ktnas.engine.evolve.loop import EvolveConfig, evolve
from ktnas.engine.evolve.predictor import batch_graphs, heldout_tau, init_predictor, kendall_tau, predict_scores
from ktnas.engine.evolve.predictor_dcl import augment, fit_dcl, nt_xent, predictor_method, pretrain_dcl, ranking_infonce
from ktnas.engine.spaces import get_space, random_genotype


def test_nt_xent_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    ref = 0.0
    for i in range(10):
        pos = (i + 5) % 10
        others = [math.exp(float(z[i] @ z[k]) / 0.2) for k in range(10) if k != i]
        ref += -math.log(math.exp(float(z[i] @ z[pos]) / 0.2) / sum(others))
    assert float(nt_xent(z1, z2, 0.2)) == pytest.approx(ref / 10, rel=1e-12)


def test_ranking_infonce_matches_its_definition():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, generator=g, dtype=torch.float64)
    acc = torch.tensor([3.0, 1.0, 1.0, 5.0, 0.0, 2.0], dtype=torch.float64)
    terms = []
    for i in range(6):
        worse = [j for j in range(6) if acc[j] < acc[i]]
        if worse:
            den = math.exp(float(s[i]) / 0.5) + sum(math.exp(float(s[j]) / 0.5) for j in worse)
            terms.append(-math.log(math.exp(float(s[i]) / 0.5) / den))
    assert float(ranking_infonce(s, acc, 0.5)) == pytest.approx(np.mean(terms), rel=1e-12)
    assert float(ranking_infonce(s, torch.ones(6, dtype=torch.float64), 0.5)) == 0  # no order: nothing to learn
    # the loss prefers scores in the measured order
    assert ranking_infonce(acc.clone(), acc, 0.5) < ranking_infonce(-acc, acc, 0.5)


def test_augment_masks_op_nodes_and_drops_edges_only():
    rng = np.random.default_rng(0)
    types, adj = batch_graphs([random_genotype("darts", rng) for _ in range(8)])
    T = get_space("darts").node_types()
    maskable = types >= T.index("out") + 1
    t, a = augment(types, adj, maskable, 99, torch.Generator().manual_seed(0), 0.5, 0.3)
    assert ((t == 99) <= maskable).all() and (t == 99).any()  # only op nodes are masked
    assert (t[t != 99] == types[t != 99]).all()
    assert (a <= adj).all() and a.sum() < adj.sum()  # edges are only dropped, never added


def test_pretraining_is_deterministic_and_learns_to_match_two_views(one_thread):
    """The NT-Xent loss falls well below its start (and below log(2B-1), chance for telling the positive)."""
    losses = []
    a = pretrain_dcl("nb201", archs=256, steps=150, hidden=16, seed=3, batch_size=64, losses=losses)
    b = pretrain_dcl("nb201", archs=256, steps=150, hidden=16, seed=3, batch_size=64)
    assert a.keys() == init_predictor("nb201", 16, 0).state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    first, last = np.mean(losses[:15]), np.mean(losses[-15:])
    assert last < 0.7 * first and last < math.log(2 * 64 - 1) - 1, (first, last)


def test_fine_tuning_ranks_held_out_architectures(one_thread):
    """A target the graph determines (DARTS normal cell: separable convs): ranked on held-out architectures."""
    pre = pretrain_dcl("darts", archs=64, steps=30, hidden=16, seed=3)
    rng = np.random.default_rng(0)
    gs = [random_genotype("darts", rng) for _ in range(24)]
    target = [sum(op.startswith("sep") for op, _ in g.normal) for g in gs]
    m = fit_dcl(pre, "darts", gs[:16], target[:16], steps=150, hidden=16, seed=0)
    s = predict_scores(m, gs)
    assert np.array_equal(s, predict_scores(fit_dcl(pre, "darts", gs[:16], target[:16], steps=150, hidden=16,
                                                    seed=0), gs))
    assert kendall_tau(s[:16], target[:16]) > 0.6 and kendall_tau(s[16:], target[16:]) > 0.3
    # the held-out tau of both predictors on the same folds (same seed: same folds)
    history = [dict(genotype=g.to_json(), val_acc=float(t)) for g, t in zip(gs, target)]
    taus = {name: heldout_tau(predictor_method(name)[0]("darts", archs=64, steps=30, hidden=16, seed=3), "darts",
                              history, folds=3, steps=100, hidden=16, seed=1, fit=predictor_method(name)[1])
            for name in ("gae", "dcl")}
    assert taus["gae"]["fold_sizes"] == taus["dcl"]["fold_sizes"] == [8, 8, 8]
    assert all(t["kendall_tau"] > 0.2 for t in taus.values()), taus


def test_evolve_with_the_dcl_predictor(tmp_path, one_thread):
    from conftest import TINY as STORE_TINY
    import warnings

    from ktnas.cache.precompute import precompute

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precompute(**dict(STORE_TINY, out=str(tmp_path / "s.zarr"), splits=("train",)))
    res = evolve(EvolveConfig(features=str(tmp_path / "s.zarr"), out=str(tmp_path / "run"), algo="predictor",
                              predictor="dcl", population=6, sample=2, cycles=6, parallel=2, cv_folds=3, space="nb201",
                              layers=3, channels=4, batch_size=32, limit=200, pretrain_archs=128, pretrain_steps=20,
                              fit_steps=20, pool=10, progress=False, device="cpu"))
    assert res["candidates"] == 12 and res["predictor"]["predictor"] == "dcl"
    assert len(res["predictor"]["folds"]) == 3
