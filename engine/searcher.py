"""One search run: the supernet, its weight optimiser and schedule, the algorithm, and the epoch's passes.

The algorithm (``ktnas.engine.algorithms``) decides what a step does; this module knows none of them."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from .algorithms import get_algorithm
from .capture import GraphStep, compile_network, resolve_capture
from .data import cycle
from .layout import resolve_layout
from .runs import progress
from .supernet import Supernet

POSTFIX_EVERY = 25  # steps between the progress bar's loss/accuracy updates (each one a device sync)


def search_layout(cfg, info: dict):
    """The supernet's built layout: the classic network on images (``stem='none'``), or what the frozen stem of
    ``info['resolution']`` px leaves of it; ``cfg.layers``/``channels``/``reductions`` override."""
    from .spaces import get_space

    resolution = None if cfg.stem == "none" else info["resolution"]
    return resolve_layout(get_space(cfg.space), resolution, "search", layers=cfg.layers, channels=cfg.channels,
                          reductions=cfg.reductions)


class SearchRun:
    """Model, optimisers and algorithm of one search (``cfg`` resolved). ``ddp``: average the gradients and the
    metrics over the ranks of the process group. ``amp`` (autocast's arguments) and ``foreach`` (gradient
    clipping's multi-tensor kernels; None: torch's default) may be changed before the first step. ``capture``: how
    the step runs (``ktnas.engine.capture``); ``fixed_arch``: the algorithm samples as tensors of fixed shape."""

    def __init__(self, cfg, device, info: dict, ddp: bool = False):
        self.cfg, self.device, self.info, self.ddp = cfg, device, info, ddp
        algo = get_algorithm(cfg.algo)
        self.layout = search_layout(cfg, info).as_dict()
        self.model = Supernet(cfg.space, info["num_classes"], info["in_channels"],
                              stem="cached" if cfg.stem == "features" else "conv", kernels=cfg.kernels,
                              recompute=cfg.recompute,
                              **algo.supernet_options(cfg), **self.layout).to(device)
        self.w_opt = torch.optim.SGD(self.model.weight_parameters(), cfg.lr, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay, nesterov=bool(cfg.nesterov))
        self.algorithm = algo(self)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, cfg.epochs, eta_min=cfg.lr_min)
        self.criterion = nn.CrossEntropyLoss()
        self.amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        self.foreach = None
        self.capture = resolve_capture(getattr(cfg, "capture", "none"), algo, device, 2 if ddp else 1)
        self.net = (compile_network(self.model, getattr(cfg, "compile_backend", "inductor"))
                    if self.capture == "compile" else self.model)
        self.fixed_arch = self.capture != "none"

    def lr(self) -> float:
        """The weights' current learning rate."""
        return self.w_opt.param_groups[0]["lr"]

    def loss(self, x, y, arch=None, net=None):
        """(cross-entropy loss, logits) of a batch under ``arch`` (None: the relaxation); a full batch through
        the compiled network under ``--capture compile``."""
        if net is None:
            net = self.net if len(x) == self.cfg.batch_size else self.model
        with torch.autocast(**self.amp):
            logits = net(x, arch)
        return self.criterion(logits.float(), y), logits

    def weight_step(self, x, y, arch=None):
        """An SGD step of the weights on a training batch (gradients clipped); (loss, logits) detached."""
        self.w_opt.zero_grad(set_to_none=True)
        loss, logits = self.loss(x, y, arch)
        loss.backward()
        if self.algorithm.dense_grads:  # the ops a sample left out get zero gradients, as with capture
            for p in self.model.weight_parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        if self.ddp:
            distributed.all_reduce_grads(self.model.weight_parameters())
        nn.utils.clip_grad_norm_(self.model.weight_parameters(), self.cfg.grad_clip, foreach=self.foreach)
        self.w_opt.step()
        return loss.detach(), logits.detach()

    def search_step(self, epoch: int, xt, yt, xv, yv, gen: torch.Generator, rng: np.random.Generator):
        """One eager step of the algorithm."""
        return self.algorithm.step(epoch, xt, yt, xv, yv, gen, rng)

    @contextlib.contextmanager
    def stepper(self, epoch: int, gen: torch.Generator, rng: np.random.Generator):
        """``step(xt, yt, xv, yv) -> (loss, logits)`` for the steps of ``epoch``, as ``--capture`` runs them
        (what ``ktnas bench search`` times): eager, or under ``graph`` one CUDA graph for the epoch (the outputs
        of a replay are overwritten by the next one)."""
        def step(xt, yt, xv, yv):
            return self.search_step(epoch, xt, yt, xv, yv, gen, rng)

        if self.capture != "graph":
            yield step
            return
        groups, amp = self.algorithm.a_opt.param_groups, self.amp
        for g in groups:  # Adam's step counter on the device (set before the first step that captures)
            g["capturable"] = True
        self.amp = dict(amp, cache_enabled=False)  # autocast's weight-cast cache is not capture-safe
        self.algorithm.seed_device(epoch)
        graph = GraphStep(self, step)
        try:
            yield graph
        finally:
            graph.close()
            self.amp = amp
            for g in groups:
                g["capturable"] = False

    def generators(self, epoch: int) -> tuple[torch.Generator, np.random.Generator]:
        """The epoch's random generators, seeded by (seed, epoch) alone: every rank and a resumed run draw alike."""
        return (torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch),
                np.random.default_rng([self.cfg.seed, epoch, 1]))

    def train_epoch(self, epoch: int, train, val) -> dict:
        cfg = self.cfg
        self.model.train()
        gen, rng = self.generators(epoch)
        # summed on the device, read by the host only for the bar now and then: no sync per step
        tot = torch.zeros(2, dtype=torch.float64 if self.device.type != "mps" else torch.float32, device=self.device)
        seen = 0
        bar = progress(zip(train, cycle(val)), total=len(train), desc=f"search {cfg.algo} epoch {epoch + 1}/"
                       f"{cfg.epochs}", enabled=cfg.progress, leave=False)
        with self.stepper(epoch, gen, rng) as step:
            for i, ((xt, yt), (xv, yv)) in enumerate(bar):
                loss, logits = step(xt, yt, xv, yv)
                tot += torch.stack([loss.detach().to(tot.dtype) * len(yt), (logits.argmax(-1) == yt).sum()])
                seen += len(yt)
                if cfg.progress and i % POSTFIX_EVERY == 0:
                    t = tot.tolist()
                    bar.set_postfix(loss=f"{t[0] / seen:.3f}", acc=f"{t[1] / seen:.3f}")
        tot_loss, correct = tot.tolist()
        correct = int(correct)
        if self.ddp:
            tot_loss, correct, seen = distributed.sum_over_ranks((tot_loss, correct, seen), self.device)
        return dict(train_loss=tot_loss / seen, train_acc=correct / seen)

    @torch.no_grad()
    def evaluate(self, val, arch_fn) -> dict:
        """Mean loss and accuracy over the validation batches, each under ``arch_fn()``."""
        tot_loss, correct, seen = 0.0, 0, 0
        for x, y in val:
            loss, logits = self.loss(x, y, arch_fn(), net=self.model)  # eager (GDAS' argmax: host indices)
            tot_loss += float(loss) * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
        if self.ddp:
            tot_loss, correct, seen = distributed.sum_over_ranks((tot_loss, correct, seen), self.device)
        return dict(val_loss=tot_loss / seen, val_acc=correct / seen)

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), w_opt=self.w_opt.state_dict(), sched=self.sched.state_dict(),
                    **self.algorithm.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.w_opt.load_state_dict(state["w_opt"])
        self.algorithm.load_state_dict(state)
        self.sched.load_state_dict(state["sched"])
