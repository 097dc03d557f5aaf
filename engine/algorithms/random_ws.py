"""Random search with weight sharing (Li & Talwalkar 2019): train the supernet under random genotypes, then keep
the best of ``candidates`` random genotypes on validation."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import field

import numpy as np
import torch

from ktnas.engine.runs import progress
from ktnas.engine.spaces import genotype_from_json, genotype_str
from ktnas.engine.algorithms.base import Algorithm, one_hot_arch, register_algorithm


@dataclasses.dataclass
class RandomOptions:
    candidates: int = field(default=100, metadata=dict(help="random genotypes evaluated on validation at the end"))


@register_algorithm
class RandomWS(Algorithm):
    """Each step trains the weights under a uniformly drawn genotype (one op per chosen edge, the others 'none'; under
    ``--budget`` only genotypes that fit are drawn);
    after the last epoch ``candidates`` random genotypes are evaluated on the whole search-validation split and
    the most accurate one is the result (its one-hot encoding is stored as the final alphas; earlier epochs keep
    the untrained, uniform alphas). Trains as DARTS."""
    name = "random"
    Options = RandomOptions
    capturable = False
    uses_arch_optimizer = False
    capture_refusal = "random search draws a new genotype on the host every step, a step of another shape each time"

    def draw(self, rng):
        """A uniformly drawn genotype; under ``--budget``, one that fits (drawn again until it does)."""
        budget, make = getattr(self.run, "budget", None), lambda: self.model.space.random_genotype(rng)
        return budget.draw(make) if budget else make()

    def random_arch(self, rng):
        return one_hot_arch(self.model, self.draw(rng))

    def step(self, epoch, xt, yt, xv, yv, gen, rng):
        return self.run.weight_step(xt, yt, self.random_arch(rng))

    def eval_arch(self, epoch):
        rng = np.random.default_rng([self.cfg.seed, epoch, 2])
        return lambda: self.random_arch(rng)

    def genotype(self, epoch, val, files):
        if epoch < self.cfg.epochs - 1:
            return None, {}
        g, rows = self.select(val)
        files.write("candidates.json", lambda p: p.write_text(json.dumps(rows, indent=1)))
        return g, {"candidates": len(rows)}

    def select(self, val):
        """Evaluate ``candidates`` random genotypes on validation, keep the best; set it as the final alphas."""
        model, rng, rows = self.model, np.random.default_rng([self.cfg.seed, 2 ** 20]), []
        for _ in progress(range(self.opts.candidates), desc="evaluate candidates", enabled=self.cfg.progress,
                          leave=False):
            g = self.draw(rng)
            arch = one_hot_arch(model, g)
            rows.append(dict(genotype=g.to_json(), genotype_str=genotype_str(g),
                             **self.run.evaluate(val, lambda: arch)))
        best = max(range(len(rows)), key=lambda i: (rows[i]["val_acc"], -rows[i]["val_loss"]))
        g = genotype_from_json(rows[best]["genotype"])
        with torch.no_grad():  # the chosen genotype as the final alphas (derive gives it back)
            for t, a in model.space.alphas_of(g).items():
                model.alphas()[t].copy_(torch.from_numpy(a))
        return g, rows
