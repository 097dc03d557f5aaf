"""DARTS (Liu et al. 2019): first order, and second order with DARTS' Architect (``architect.py``)."""
from __future__ import annotations

import dataclasses
from dataclasses import field

import torch

from ktnas.engine import distributed
from ktnas.engine.algorithms.base import Algorithm, register_algorithm


def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def unrolled_arch_grad(model, loss_fn, xt, yt, xv, yv, eta: float, w_opt=None, momentum: float = 0.9,
                       weight_decay: float = 3e-4, r: float = 1e-2, reduce=None) -> list[torch.Tensor]:
    """DARTS' second-order architecture gradient (``Architect._backward_step_unrolled``), returned per
    ``model.arch_parameters()``: the gradient at the one-step unrolled weights w' = w - eta (momentum buffer *
    momentum + dL_train/dw + wd w), minus eta times the Hessian-vector product by central finite differences with
    R = r / ||dL_val/dw'||. ``loss_fn(x, y)`` is the model's loss on a batch. The weights are left as they were
    (restored from a copy). ``reduce`` (e.g. ``distributed.all_reduce_mean``) is applied to each gradient list
    as soon as it is computed, so under DDP every quantity uses the gradients averaged over the ranks."""
    reduce = reduce or (lambda grads: grads)
    W, A = model.weight_parameters(), model.arch_parameters()
    theta = [p.detach().clone() for p in W]
    dtheta = reduce(_grads(loss_fn(xt, yt), W))
    with torch.no_grad():
        for p, g in zip(W, dtheta):
            buf = None if w_opt is None else w_opt.state.get(p, {}).get("momentum_buffer")
            m = 0 if buf is None else buf * momentum
            p.sub_(eta * (m + g + weight_decay * p))
    g = reduce(_grads(loss_fn(xv, yv), A + W))
    dalpha, vector = g[:len(A)], g[len(A):]
    R = r / torch.cat([v.flatten() for v in vector]).norm()
    with torch.no_grad():
        for p, t, v in zip(W, theta, vector):
            p.copy_(t + R * v)
    grads_p = reduce(_grads(loss_fn(xt, yt), A))
    with torch.no_grad():
        for p, t, v in zip(W, theta, vector):
            p.copy_(t - R * v)
    grads_n = reduce(_grads(loss_fn(xt, yt), A))
    with torch.no_grad():
        for p, t in zip(W, theta):
            p.copy_(t)
    return [da - eta * (gp - gn) / (2 * R) for da, gp, gn in zip(dalpha, grads_p, grads_n)]


@dataclasses.dataclass
class DartsOptions:
    """DARTS' own options (train_search.py and architect.py)."""
    order: int = field(default=1, metadata=dict(choices=(1, 2), help="1: first order; 2: the architecture "
                                                                       "gradient at the unrolled weights"))
    warmup: int | None = field(default=None, metadata=dict(min=0, help=(
        "epochs whose steps train the weights only, before the architecture parameters train (default: 0)")))
    unrolled_r: float = field(default=1e-2, metadata=dict(help=(
        "order 2: the finite-difference step of the Hessian-vector product is R = r / ||dL_val/dw'||")))


@register_algorithm
class Darts(Algorithm):
    """Per step an Adam step of the alphas on a validation batch, then an SGD step of the weights on a training
    batch. ``order=2``: the alphas' gradient at the unrolled weights (:func:`unrolled_arch_grad`)."""
    name = "darts"
    Options = DartsOptions
    variants = {"darts-1": {}, "darts-2": {"order": 2}}

    @classmethod
    def resolve(cls, cfg, opts):
        if opts.warmup is None:
            opts.warmup = 0
        super().resolve(cfg, opts)

    def arch_step(self, xt, yt, xv, yv, arch=None):
        if self.opts.order == 1:
            return super().arch_step(xt, yt, xv, yv, arch)
        self.a_opt.zero_grad(set_to_none=True)
        run, cfg = self.run, self.cfg
        grads = unrolled_arch_grad(self.model, lambda x, y: run.loss(x, y)[0], xt, yt, xv, yv, run.lr(), run.w_opt,
                                   cfg.momentum, cfg.weight_decay, self.opts.unrolled_r,
                                   reduce=distributed.all_reduce_mean if run.ddp else None)
        for p, g in zip(self.model.arch_parameters(), grads):
            p.grad = g
        if getattr(run, "budget", None) is not None:  # --budget: the expected cost's penalty adds its gradient
            run.budget.penalty(self.model.alphas()).backward()
        self.a_opt.step()
