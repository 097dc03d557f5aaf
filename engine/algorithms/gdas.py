"""GDAS (Dong & Yang 2019): one op per edge, drawn by a hard Gumbel-softmax sample with a decaying temperature."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Algorithm, register_algorithm


def gumbel_noise(shape, gen: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise drawn on the CPU from ``gen`` (the same draws on every device)."""
    return -torch.empty(shape, dtype=torch.float32).exponential_(generator=gen).log()


def hard_sample(alpha: torch.Tensor, noise: torch.Tensor, tau: float):
    """GDAS' straight-through sample of one alpha matrix for given Gumbel ``noise``: (weights ``one_hot -
    p.detach() + p``, the sampled index per edge)."""
    probs = F.softmax((F.log_softmax(alpha, dim=-1) + noise) / tau, dim=-1)
    idx = probs.argmax(-1)
    hard = torch.zeros_like(probs).scatter_(-1, idx[:, None], 1.0)
    return hard - probs.detach() + probs, idx


def gumbel_arch(model, tau: float, gen: torch.Generator) -> dict:
    """A hard Gumbel-softmax sample per edge: (straight-through weights, sampled index) per cell type; a draw
    whose weights are not finite is drawn again."""
    arch = {}
    for t, a in model.alphas().items():
        while True:
            w, idx = hard_sample(a, gumbel_noise(a.shape, gen).to(a.device, a.dtype), tau)
            if torch.isfinite(w).all():
                break
        arch[t] = (w, idx.tolist())
    return arch


def argmax_arch(model) -> dict:
    """The most likely op per edge, one-hot (GDAS' evaluation)."""
    arch = {}
    for t, a in model.alphas().items():
        idx = a.detach().argmax(-1)
        arch[t] = (F.one_hot(idx, a.shape[1]).to(a.dtype), idx.tolist())
    return arch


@register_algorithm
class Gdas(Algorithm):
    """Per step a Gumbel-softmax hard sample per edge, temperature tau linear from ``tau_max`` (10) at the first
    epoch to ``tau_min`` (0.1) at the last, only the sampled op computed; an SGD step of the weights on a training
    batch, then an Adam step of the alphas on a validation batch, each under its own sample (AutoDL's order).
    Defaults: NAS-Bench-201's GDAS settings."""
    name = "gdas"
    defaults = dict(epochs=250, batch_size=64, lr=0.025, lr_min=0.001, weight_decay=5e-4, nesterov=True,
                    arch_lr=3e-4)

    def tau(self, epoch: int) -> float:
        cfg = self.cfg
        return cfg.tau_max - (cfg.tau_max - cfg.tau_min) * epoch / max(1, cfg.epochs - 1)

    def sample(self, epoch: int, gen: torch.Generator) -> dict:
        return gumbel_arch(self.model, self.tau(epoch), gen)

    def step(self, epoch, xt, yt, xv, yv, gen, rng):
        loss, logits = self.run.weight_step(xt, yt, self.sample(epoch, gen))
        self.arch_step(xt, yt, xv, yv, self.sample(epoch, gen))
        return loss, logits

    def epoch_info(self, epoch):
        return {"tau": self.tau(epoch)}

    def eval_arch(self, epoch):
        return lambda: argmax_arch(self.model)
