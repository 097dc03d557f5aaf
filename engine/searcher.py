"""One search run: the supernet, its weight optimiser and schedule, the algorithm, and the epoch's passes.

The algorithm (``ktnas.engine.algorithms``) decides what a step does; this module knows none of them."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from .algorithms import get_algorithm
from .data import cycle
from .layout import resolve_layout
from .runs import progress
from .supernet import Supernet


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
    clipping's multi-tensor kernels; None: torch's default) may be changed before the first step."""

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

    def lr(self) -> float:
        """The weights' current learning rate."""
        return self.w_opt.param_groups[0]["lr"]

    def loss(self, x, y, arch=None):
        """(cross-entropy loss, logits) of a batch under ``arch`` (None: the relaxation)."""
        with torch.autocast(**self.amp):
            logits = self.model(x, arch)
        return self.criterion(logits.float(), y), logits

    def weight_step(self, x, y, arch=None):
        """An SGD step of the weights on a training batch (gradients clipped); (loss, logits) detached."""
        self.w_opt.zero_grad(set_to_none=True)
        loss, logits = self.loss(x, y, arch)
        loss.backward()
        if self.ddp:
            distributed.all_reduce_grads(self.model.weight_parameters())
        nn.utils.clip_grad_norm_(self.model.weight_parameters(), self.cfg.grad_clip, foreach=self.foreach)
        self.w_opt.step()
        return loss.detach(), logits.detach()

    def search_step(self, epoch: int, xt, yt, xv, yv, gen: torch.Generator, rng: np.random.Generator):
        """One step of the algorithm (what ``ktnas bench search`` times)."""
        return self.algorithm.step(epoch, xt, yt, xv, yv, gen, rng)

    def generators(self, epoch: int) -> tuple[torch.Generator, np.random.Generator]:
        """The epoch's random generators, seeded by (seed, epoch) alone: every rank and a resumed run draw alike."""
        return (torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch),
                np.random.default_rng([self.cfg.seed, epoch, 1]))

    def train_epoch(self, epoch: int, train, val) -> dict:
        cfg = self.cfg
        self.model.train()
        gen, rng = self.generators(epoch)
        tot_loss, correct, seen = 0.0, 0, 0
        bar = progress(zip(train, cycle(val)), total=len(train), desc=f"search {cfg.algo} epoch {epoch + 1}/"
                       f"{cfg.epochs}", enabled=cfg.progress, leave=False)
        for (xt, yt), (xv, yv) in bar:
            loss, logits = self.search_step(epoch, xt, yt, xv, yv, gen, rng)
            tot_loss += float(loss) * len(yt)
            correct += int((logits.argmax(-1) == yt).sum())
            seen += len(yt)
            bar.set_postfix(loss=f"{tot_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        if self.ddp:
            tot_loss, correct, seen = distributed.sum_over_ranks((tot_loss, correct, seen), self.device)
        return dict(train_loss=tot_loss / seen, train_acc=correct / seen)

    @torch.no_grad()
    def evaluate(self, val, arch_fn) -> dict:
        """Mean loss and accuracy over the validation batches, each under ``arch_fn()``."""
        tot_loss, correct, seen = 0.0, 0, 0
        for x, y in val:
            loss, logits = self.loss(x, y, arch_fn())
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
