"""Where ``ktnas evolve``'s next candidates come from: random sampling, regularized (aging) evolution, and
evolution guided by the predictor. A proposer knows nothing of training: it reads the evaluated history and
returns genotypes, with what made each (origin, parent, mutation, predicted score)."""
from __future__ import annotations

import json
import math

import numpy as np

from ktnas.engine.evolve.front import pareto_front
from ktnas.engine.evolve.predictor import derive_seed, predict_scores
from ktnas.engine.evolve.predictor_dcl import predictor_method
from ktnas.engine.spaces import genotype_from_json, get_space


def rank_key(r: dict):
    """Best first: higher validation accuracy, then lower validation loss, then earlier."""
    loss = r["val_loss"] if r["val_loss"] is not None else math.inf
    return (-r["val_acc"], loss, r["index"])


def best_of(history: list[dict]) -> dict | None:
    return min(history, key=rank_key) if history else None


def tournament(population: list[dict], sample: int, rng: np.random.Generator, costs: tuple = ()) -> dict:
    """Real et al.'s tournament: ``sample`` members drawn with replacement, the most accurate wins (the first
    drawn on ties). ``costs`` (objectives beside accuracy, keys of the members' ``deploy`` values): a member
    drawn at random from the drawn ones' Pareto front wins."""
    drawn = [population[i] for i in rng.integers(len(population), size=sample)]
    if not costs:
        return max(drawn, key=lambda r: r["val_acc"])
    front = pareto_front(drawn, costs)
    return drawn[front[int(rng.integers(len(front)))]]


def genotype_key(g) -> str:
    return json.dumps(g.to_json(), sort_keys=True)


class RandomProposer:
    """Architectures sampled uniformly."""

    def __init__(self, cfg):
        self.cfg, self.space = cfg, get_space(cfg.space)
        self.budget = None  # under --budget (a SearchBudget): only genotypes that fit are proposed
        self.costs: tuple = ()  # --objectives beside accuracy: tournaments are won on the Pareto front
        self.screened: list | None = None  # --proxy: the initial population, screened (best first)

    def draw(self, rng, make=None):
        """``make()`` (default: a uniform draw); under a budget, again until it fits."""
        make = make or (lambda: self.space.random_genotype(rng))
        return self.budget.draw(make) if self.budget else make()

    def propose(self, history: list[dict], k: int, rng: np.random.Generator) -> list[tuple[object, dict]]:
        start = len(history)
        if self.screened and start < self.cfg.population:
            return [(genotype_from_json(s["genotype"]), dict(origin="proxy", proxy_score=s["score"],
                                                             proxy_rank=s["pool_rank"]))
                    for s in self.screened[start:start + k]]
        return [(self.draw(rng), dict(origin="random")) for _ in range(k)]


class EvolutionProposer(RandomProposer):
    """Regularized evolution (Real et al. 2019, Algorithm 1): random until the population is full, then per
    candidate a tournament of the last ``population`` candidates whose winner is mutated."""

    def propose(self, history, k, rng):
        if len(history) < self.cfg.population:
            return super().propose(history, k, rng)
        return self.children(history[-self.cfg.population:], k, rng)

    def child(self, population, rng) -> tuple[object, dict]:
        parent = tournament(population, self.cfg.sample, rng, self.costs)
        g, out = genotype_from_json(parent["genotype"]), {}

        def mutant():
            out["child"], out["what"] = self.space.mutate(g, rng)
            return out["child"]

        self.draw(rng, mutant)
        return out["child"], dict(origin="mutation", parent=parent["index"], mutation=out["what"])

    def children(self, population, k, rng):
        return [self.child(population, rng) for _ in range(k)]


class PredictorProposer(EvolutionProposer):
    """The same evolution, but each cycle ``pool`` distinct unseen children are ranked by the predictor (fitted
    on every evaluated candidate from the pre-trained ``pretrained`` state) and only the top ``k`` proposed."""

    def __init__(self, cfg, pretrained: dict):
        super().__init__(cfg)
        self.pretrained = pretrained

    def pool(self, history, population, k, rng) -> tuple[list, list[dict]]:
        cfg = self.cfg
        seen = {genotype_key(genotype_from_json(r["genotype"])) for r in history}
        pool, metas, attempts = [], [], 0
        while len(pool) < cfg.pool and attempts < 20 * cfg.pool:
            attempts += 1
            child, meta = self.child(population, rng)
            if genotype_key(child) not in seen:
                seen.add(genotype_key(child))
                pool.append(child)
                metas.append(dict(meta, origin="predictor"))
        while len(pool) < k:  # the neighbourhoods are exhausted: fill with unseen random architectures
            child = self.draw(rng)
            if genotype_key(child) not in seen or attempts > 1000 * cfg.pool:
                seen.add(genotype_key(child))
                pool.append(child)
                metas.append(dict(origin="predictor-random"))
            attempts += 1
        return pool, metas

    def children(self, population, k, rng):
        cfg, history = self.cfg, self.history
        pool, metas = self.pool(history, population, k, rng)
        fit = predictor_method(cfg.predictor)[1]
        model = fit(self.pretrained, cfg.space, [genotype_from_json(r["genotype"]) for r in history],
                    [r["val_acc"] for r in history], steps=cfg.fit_steps, hidden=cfg.hidden,
                    seed=derive_seed(cfg.seed, len(history)))
        scores = predict_scores(model, pool)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(pool[i], dict(metas[i], predicted=float(scores[i]), predicted_rank=r + 1, pool=len(pool)))
                for r, i in enumerate(order)]

    def propose(self, history, k, rng):
        self.history = history
        return super().propose(history, k, rng)


PROPOSERS = {"random": RandomProposer, "rea": EvolutionProposer, "predictor": PredictorProposer}
