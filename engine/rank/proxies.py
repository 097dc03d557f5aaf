"""Zero-cost proxies: scores of an untrained network from one or a few minibatches, meant to rank architectures
as their trained accuracy would. Each proxy is as its paper defines it and as its authors' code computes it
(the formula in its docstring); higher means predicted better. ``params`` and ``flops`` are the baselines every
proxy must beat to be worth its cost (NAS-Bench-Suite-Zero; ZiCo reports that most proxies do not).

A proxy takes ``(net, batches)``: a freshly initialised network (its forward returns logits, or (logits, aux))
and a list of (inputs, labels) batches; it may change the network (synflow linearises its weights), so each
proxy gets its own copy (:func:`score`). The weights a proxy reads are those of the convolutions and linear layers
(the "prunable" layers of the zero-cost code)."""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ktnas.cache.errors import KtnasError

PROXIES: dict = {}


def proxy(name: str, batches: int = 1):
    """Register a proxy under ``name``; ``batches``: how many minibatches it reads (at least)."""
    def wrap(fn):
        fn.proxy_name, fn.batches = name, batches
        PROXIES[name] = fn
        return fn
    return wrap


def logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    return out[0] if isinstance(out, tuple) else out


def layers(net: nn.Module) -> list[nn.Module]:
    """The convolutions and linear layers, in module order."""
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _loss_grads(net, x, y):
    net.zero_grad(set_to_none=True)
    F.cross_entropy(logits(net, x), y).backward()
    return [(m.weight.detach(), m.weight.grad if m.weight.grad is not None else torch.zeros_like(m.weight))
            for m in layers(net)]


@proxy("grad_norm")
def grad_norm(net, batches) -> float:
    """Σ_l ||∂L/∂W_l||₂ over the convolutions and linear layers, L the cross-entropy of one minibatch
    (Abdelfattah et al., ICLR 2021, "grad_norm")."""
    x, y = batches[0]
    return float(sum(g.norm() for _, g in _loss_grads(net, x, y)))


@proxy("snip")
def snip(net, batches) -> float:
    """Σ_l Σ |W_l ⊙ ∂L/∂W_l|, the connection sensitivity of SNIP (Lee et al., ICLR 2019) summed over the network
    (Abdelfattah et al., ICLR 2021)."""
    x, y = batches[0]
    return float(sum((w * g).abs().sum() for w, g in _loss_grads(net, x, y)))


@proxy("synflow")
def synflow(net, batches) -> float:
    """SynFlow (Tanaka et al., NeurIPS 2020) as Abdelfattah et al. score networks: batch normalisation removed,
    every weight replaced by its absolute value, in float64, R = Σ f(1) for an all-ones input of one sample;
    score Σ_l Σ |W_l ⊙ ∂R/∂W_l|. Data-independent."""
    x, _ = batches[0]
    _drop_batchnorm(net)
    net.double()
    with torch.no_grad():
        for p in net.state_dict().values():
            if p.is_floating_point():
                p.abs_()
    net.zero_grad(set_to_none=True)
    logits(net, torch.ones((1, *x.shape[1:]), dtype=torch.float64, device=x.device)).sum().backward()
    return float(sum((m.weight.detach() * m.weight.grad).abs().sum() for m in layers(net)
                     if m.weight.grad is not None))


def _drop_batchnorm(net: nn.Module) -> None:
    for name, child in list(net.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(net, name, nn.Identity())
        else:
            _drop_batchnorm(child)


@proxy("jacov")
def jacov(net, batches) -> float:
    """Jacobian covariance (Mellor et al., "Neural Architecture Search without Training", arXiv v1, 2020): J the
    gradients of each sample's summed output with respect to its input, Σ the correlation matrix of J's rows,
    λ its eigenvalues, score −Σ_i [log(λ_i + k) + 1/(λ_i + k)], k = 1e-5 (round-off below 0 taken as 0, and the
    correlation of a constant row as 0, where the authors' code gives NaN)."""
    x, _ = batches[0]
    x = x.detach().clone().requires_grad_(True)
    out = logits(net, x)
    out.backward(torch.ones_like(out))
    J = x.grad.reshape(len(x), -1).double().cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):  # a sample whose gradient is constant: no correlation
        corr = np.corrcoef(J)
    v = np.linalg.eigvalsh(np.nan_to_num(corr))  # symmetric: real eigenvalues
    k = 1e-5
    return float(-np.sum(np.log(np.maximum(v, 0) + k) + 1.0 / (np.maximum(v, 0) + k)))


@proxy("naswot")
def naswot(net, batches) -> float:
    """NASWOT (Mellor et al., ICML 2021): c_i the binary code of which ReLUs sample i activates (> 0), K_H[i, j] =
    Σ over the codes' units of [c_i = c_j] (units minus the Hamming distance), score log |det K_H|."""
    x, _ = batches[0]
    K = torch.zeros(len(x), len(x), dtype=torch.float64, device=x.device)

    def hook(module, inputs, output):
        c = (inputs[0].detach().reshape(len(x), -1) > 0).double()
        K.add_(c @ c.t() + (1 - c) @ (1 - c).t())

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            logits(net, x)
    finally:
        for h in handles:
            h.remove()
    return float(torch.linalg.slogdet(K)[1])


@proxy("zico", batches=2)
def zico(net, batches) -> float:
    """ZiCo (Li et al., ICLR 2023): over B >= 2 minibatches the gradient g_θ of the cross-entropy for every weight
    of each convolution and linear layer; score Σ_l log Σ_θ∈l E_B|g_θ| / σ_B(g_θ), weights whose gradient does not
    vary left out (a layer with none left out of the sum)."""
    if len(batches) < 2:
        raise KtnasError("zico reads at least 2 minibatches: pass --batches 2 or more")
    grads: list[list[np.ndarray]] = []
    for x, y in batches:
        g = [gr.detach().double().reshape(-1).cpu().numpy() for _, gr in _loss_grads(net, x, y)]
        grads.append(g)
    total = 0.0
    for per_layer in zip(*grads):
        G = np.stack(per_layer)
        sd = G.std(axis=0)
        keep = sd != 0
        s = float(np.sum(np.abs(G).mean(axis=0)[keep] / sd[keep]))
        if s != 0:
            total += math.log(s)
    return total


def score(name: str, net: nn.Module, batches) -> float:
    """Proxy ``name`` of a copy of ``net`` (left as it is) on ``batches``; a value that is not finite (NASWOT's log
    of a singular kernel, SynFlow's overflow, a NaN) is clamped to the largest float of its sign (NaN: the lowest),
    so that rankings stay defined: tied at the bottom or the top."""
    if name not in PROXIES:
        raise KtnasError(f"unknown proxy {name!r}: use {', '.join(sorted(PROXIES))}, params or flops")
    work = copy.deepcopy(net).train()
    big = np.finfo(np.float64).max
    return float(np.nan_to_num(PROXIES[name](work, batches), nan=-big, neginf=-big, posinf=big))
