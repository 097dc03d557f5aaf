"""``ktnas evolve --proxy NAME --proxy-pool M``: the initial population screened by a zero-cost proxy.

``M`` distinct architectures are drawn (within ``--budget`` when one is given), each candidate network is built
as the run builds its candidates and scored by the proxy (:mod:`ktnas.engine.rank`) on minibatches of the
candidate-train part of the store's train split, and the best ``--population`` become the initial population, the
start of regularized evolution and of the predictors (random search: its first ``--population`` candidates). The
pool, its scores and the choice are kept in the run's checkpoint, so a resumed run trains the same ones."""
from __future__ import annotations

import time

import numpy as np

from ktnas.cache.errors import KtnasError
from ktnas.engine.data import split_indices
from ktnas.engine.spaces import distinct_genotypes

POOL_SEED = 53  # the pool's draws: a generator of (seed, POOL_SEED), apart from every other draw of the run


def proxy_pool(space, m: int, seed: int, budget=None) -> list:
    """``m`` distinct architectures of ``space`` drawn uniformly (again until they fit ``budget``)."""
    try:
        return distinct_genotypes(space, m, seed, tag=POOL_SEED, draw=budget.draw if budget else None)
    except KtnasError as e:
        raise KtnasError(f"{e} (--proxy-pool)") from None


def screen(cfg, store, device, budget=None, progress: bool = True) -> dict:
    """{proxy, pool, seconds, chosen: the best --population of the pool, best first: {genotype, score,
    pool_rank}} (see the module docstring)."""
    from ktnas.engine.rank.run import RankConfig, rank_batches, score_architecture
    from ktnas.engine.runs import progress as bar

    t = time.perf_counter()
    pool = proxy_pool(cfg.space, cfg.proxy_pool, cfg.seed, budget)
    rcfg = RankConfig(features=cfg.features, space=cfg.space, proxy=cfg.proxy, batch_size=cfg.batch_size,
                      layers=cfg.layers, channels=cfg.channels, seed=cfg.seed)
    sp = store.split("train")
    n = sp.shape[0] if cfg.limit is None else min(cfg.limit, sp.shape[0])
    batches, build = rank_batches(rcfg, store, device, indices=split_indices(n, cfg.seed, cfg.train_portion)[0])
    scores = [score_architecture(g, i, rcfg, [cfg.proxy], batches, build, device)["scores"][cfg.proxy]
              for i, g in bar(list(enumerate(pool)), desc=f"evolve: screening by {cfg.proxy}", enabled=progress)]
    order = np.argsort(-np.asarray(scores), kind="stable")[:cfg.population]
    chosen = [dict(genotype=pool[i].to_json(), score=float(scores[i]), pool_rank=r + 1) for r, i in enumerate(order)]
    return dict(proxy=cfg.proxy, pool=len(pool), seconds=time.perf_counter() - t, chosen=chosen)
