"""GDAS (Dong & Yang 2019): one op per edge, drawn by a hard Gumbel-softmax sample with a decaying temperature."""
from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
import torch.nn.functional as F

from ktnas.cache.errors import KtnasError

from ktnas.engine.algorithms.base import Algorithm, register_algorithm


def gumbel_noise(shape, gen: torch.Generator | None, device=None) -> torch.Tensor:
    """Standard Gumbel noise, -log(E) with E ~ Exp(1) drawn from ``gen`` on its device (the CPU: the same draws
    on every device), or with ``gen`` None on ``device`` from its default generator (a CUDA graph's draws). E is
    clamped to the smallest normal float, so the noise is always finite (AutoDL's GDAS draws again instead: a
    host loop a captured step cannot have)."""
    e = torch.empty(shape, dtype=torch.float32, device=device if gen is None else gen.device)
    return -e.exponential_(generator=gen).clamp_min_(torch.finfo(torch.float32).tiny).log()


def hard_sample(alpha: torch.Tensor, noise: torch.Tensor, tau: float):
    """GDAS' straight-through sample of one alpha matrix for given Gumbel ``noise``: (weights ``one_hot -
    p.detach() + p``, the one-hot [E, K], the sampled index per edge as a tensor)."""
    probs = F.softmax((F.log_softmax(alpha, dim=-1) + noise) / tau, dim=-1)
    idx = probs.argmax(-1)
    hard = torch.zeros_like(probs).scatter_(-1, idx[:, None], 1.0)
    return hard - probs.detach() + probs, hard, idx


def gumbel_arch(model, tau: float, gen: torch.Generator | None, fixed: bool = False) -> dict:
    """A hard Gumbel-softmax sample per edge, per cell type: (straight-through weights, sampled index list),
    only the sampled op computed. ``fixed``: the same sample as tensors of fixed shape, (weights masked by the
    one-hot, None): every op is computed and the ones not sampled weigh exactly 0, so the values, the alphas'
    gradients and the sampled ops' weight gradients are those of the sampled op alone (the others' weight
    gradients are zeros, as :attr:`Gdas.dense_grads` gives the eager step too); no host read."""
    arch = {}
    for t, a in model.alphas().items():
        noise = gumbel_noise(a.shape, gen, a.device).to(a.device, a.dtype)
        w, hard, idx = hard_sample(a, noise, tau)
        arch[t] = (hard * w, None) if fixed else (w, idx.tolist())
    return arch


def argmax_arch(model) -> dict:
    """The most likely op per edge, one-hot (GDAS' evaluation)."""
    arch = {}
    for t, a in model.alphas().items():
        idx = a.detach().argmax(-1)
        arch[t] = (F.one_hot(idx, a.shape[1]).to(a.dtype), idx.tolist())
    return arch


@dataclasses.dataclass
class GdasOptions:
    """GDAS' temperature schedule (NAS-Bench-201's GDAS settings)."""
    tau_max: float = field(default=10.0, metadata=dict(help="Gumbel-softmax temperature at the first epoch"))
    tau_min: float = field(default=0.1, metadata=dict(help="temperature at the last epoch (linear in between)"))
    warmup: int = field(default=0, metadata=dict(min=0, help=(
        "epochs whose steps train the weights only, before the architecture parameters train (GDAS: 0)")))


@register_algorithm
class Gdas(Algorithm):
    """Per step a Gumbel-softmax hard sample per edge, temperature tau linear from ``tau_max`` (10) at the first
    epoch to ``tau_min`` (0.1) at the last, only the sampled op computed; an SGD step of the weights on a training
    batch, then an Adam step of the alphas on a validation batch, each under its own sample (AutoDL's order).
    The weights of the ops a sample leaves out get zero gradients (weight decay and momentum go on acting on
    them), eagerly and captured alike. Defaults: NAS-Bench-201's GDAS settings."""
    name = "gdas"
    Options = GdasOptions
    defaults = dict(epochs=250, batch_size=64, lr=0.025, lr_min=0.001, weight_decay=5e-4, nesterov=True,
                    arch_lr=3e-4)

    @classmethod
    def resolve(cls, cfg, opts):
        if not 0 < opts.tau_min <= opts.tau_max:
            raise KtnasError(f"--tau-min and --tau-max must satisfy 0 < tau-min <= tau-max, got {opts.tau_min} and "
                             f"{opts.tau_max}")
        super().resolve(cfg, opts)

    def tau(self, epoch: int) -> float:
        o = self.opts
        return o.tau_max - (o.tau_max - o.tau_min) * epoch / max(1, self.cfg.epochs - 1)

    dense_grads = True  # as AutoDL's GDAS under PyTorch 1.x, whose zero_grad zeroed the gradients (not None)

    def sample(self, epoch: int, gen: torch.Generator) -> dict:
        graph = self.run.capture == "graph"  # a graph replays its draws from the device's own generator
        return gumbel_arch(self.model, self.tau(epoch), None if graph else gen, fixed=self.run.fixed_arch)

    def seed_device(self, epoch: int) -> None:
        torch.cuda.manual_seed(self.cfg.seed * 1_000_003 + epoch)

    def step(self, epoch, xt, yt, xv, yv, gen, rng):
        loss, logits = self.run.weight_step(xt, yt, self.sample(epoch, gen))
        if epoch >= self.arch_start(self.cfg):
            self.arch_step(xt, yt, xv, yv, self.sample(epoch, gen))
        return loss, logits

    def epoch_info(self, epoch):
        return {"tau": self.tau(epoch)}

    def eval_arch(self, epoch):
        return lambda: argmax_arch(self.model)
