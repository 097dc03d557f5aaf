"""One search run: the supernet, its weight optimiser and schedule, the algorithm, and the epoch's passes.

The algorithm (``ktnas.engine.algorithms``) decides what a step does; this module knows none of them."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from ktnas.engine import distributed
from ktnas.engine.algorithms import get_algorithm
from ktnas.engine.search.capture import GraphStep, compile_network, resolve_capture, set_capturable
from ktnas.engine.data import cycle
from ktnas.engine.layout import resolve_layout
from ktnas.engine.runs import progress
from ktnas.engine.search.budget import search_budget
from ktnas.engine.search.supernet import Supernet

EVAL_GROUP = 2  # validation batches per forward of the validation pass
POSTFIX_EVERY = 25  # steps between the progress bar's loss/accuracy updates (each one a device sync)


class _Counted:
    """``step`` called as is, counting its calls (how an epoch's steps ran, for its metrics)."""

    def __init__(self, step, mode: str):
        self.step, self.mode, self.called = step, mode, 0

    def __call__(self, *batch):
        self.called += 1
        return self.step(*batch)

    def report(self) -> dict:
        return dict(mode=self.mode, replays=0, called=self.called)


def grouped(batches, n: int):
    """``n`` consecutive (x, y) batches at a time, concatenated (the last group may be smaller)."""
    group = []
    for b in batches:
        group.append(b)
        if len(group) == n:
            yield tuple(torch.cat(t) for t in zip(*group))
            group = []
    if group:
        yield tuple(torch.cat(t) for t in zip(*group))


def search_layout(cfg, info: dict):
    """The supernet's built layout: the classic network on images (``stem='none'``), or what the frozen stem of
    ``info['resolution']`` px leaves of it; ``cfg.layers``/``channels``/``reductions`` override."""
    from ktnas.engine.spaces import get_space

    resolution = None if cfg.stem == "none" else info["resolution"]
    return resolve_layout(get_space(cfg.space), resolution, "search", layers=cfg.layers, channels=cfg.channels,
                          reductions=cfg.reductions)


class SearchRun:
    """Model, optimisers and algorithm of one search (``cfg`` resolved). ``ddp``: average the gradients and the
    metrics over the ranks of the process group. ``amp`` (autocast's arguments) and ``foreach`` (gradient
    clipping's multi-tensor kernels; None: torch's default) may be changed before the first step. ``capture``: how
    the step runs (``ktnas.engine.search.capture``); ``fixed_arch``: the algorithm samples as tensors of fixed shape."""

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
        self.budget = search_budget(cfg, info, self.model.space, device, ddp)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, cfg.epochs, eta_min=cfg.lr_min)
        self.criterion = nn.CrossEntropyLoss()
        self.amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        self.foreach = None
        self.arch_start = algo.arch_start(cfg)  # the first epoch whose steps train the architecture
        self.capture = resolve_capture(cfg.capture, algo, device, 2 if ddp else 1)
        self.net = (compile_network(self.model, cfg.compile_backend)
                    if self.capture == "compile" else self.model)
        self.fixed_arch = self.capture != "none"
        self.capture_failed: str | None = None  # why the graph could not be captured (the search goes on eagerly)
        self.steps_report: dict = {}
        self.eval_report: dict = {}
        self.eval_failed: str | None = None  # why the validation pass could not be captured

    def lr(self) -> float:
        """The weights' current learning rate."""
        return self.w_opt.param_groups[0]["lr"]

    def loss(self, x, y, arch=None, net=None, logits_only=False):
        """(cross-entropy loss, logits) of a batch under ``arch`` (None: the relaxation), or the logits alone;
        a full batch through the compiled network under ``--capture compile``."""
        if net is None:
            net = self.net if len(x) == self.cfg.batch_size else self.model
        with torch.autocast(**self.amp):
            logits = net(x, arch)
        return logits if logits_only else (self.criterion(logits.float(), y), logits)

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
        of a replay are overwritten by the next one). A capture that failed once (``capture_failed``: why) is not
        tried again: the rest of the search runs eagerly. ``steps_report`` says how the epoch's steps ran."""
        def step(xt, yt, xv, yv):
            return self.search_step(epoch, xt, yt, xv, yv, gen, rng)

        if self.capture != "graph" or self.capture_failed is not None:
            counted = _Counted(step, {"none": "eager", "compile": "compiled"}.get(self.capture, "eager") if
                               self.capture_failed is None else f"eager (capture failed: {self.capture_failed})")
            yield counted
            self.steps_report = counted.report()
            return
        amp = self.amp
        set_capturable(self.algorithm.a_opt, True)  # Adam's step counter on the device, before any step captures
        self.amp = dict(amp, cache_enabled=False)  # autocast's weight-cast cache is not capture-safe
        self.algorithm.seed_device(epoch)
        graph = GraphStep(self, step)
        try:
            yield graph
        finally:
            self.steps_report = graph.report()
            self.capture_failed = graph.failed
            graph.close()
            self.amp = amp
            set_capturable(self.algorithm.a_opt, False)

    def _totals(self) -> torch.Tensor:
        """[loss sum, correct] on the device (MPS has no float64): summed there, read by the host at the end."""
        return torch.zeros(2, dtype=torch.float64 if self.device.type != "mps" else torch.float32, device=self.device)

    def generators(self, epoch: int) -> tuple[torch.Generator, np.random.Generator]:
        """The epoch's random generators, seeded by (seed, epoch) alone: every rank and a resumed run draw alike."""
        return (torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch),
                np.random.default_rng([self.cfg.seed, epoch, 1]))

    def train_epoch(self, epoch: int, train, val) -> dict:
        cfg = self.cfg
        self.model.train()
        gen, rng = self.generators(epoch)
        tot = self._totals()  # summed on the device, read by the host only for the bar now and then
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
        return dict(train_loss=tot_loss / seen, train_acc=correct / seen, steps=self.steps_report)

    @contextlib.contextmanager
    def evaluator(self, arch_fn):
        """``forward(x) -> logits`` for the validation pass: eager, each call under ``arch_fn()``; or, where the
        search step is captured in a CUDA graph (and no capture has failed), captured too, under one ``arch_fn()``
        for the pass (the alphas do not change during it) and replayed. ``eval_report`` says how it ran."""
        if self.capture != "graph" or self.capture_failed is not None or self.eval_failed is not None:
            counted = _Counted(lambda x: self.loss(x, None, arch_fn(), net=self.model, logits_only=True), "eager")
            yield counted
            self.eval_report = counted.report()
            return
        arch, amp = arch_fn(), self.amp
        self.amp = dict(amp, cache_enabled=False)  # autocast's weight-cast cache is not capture-safe
        graph = GraphStep(self, lambda x: self.loss(x, None, arch, net=self.model, logits_only=True), warmup=1,
                          what="validation pass")
        try:
            yield graph
        finally:
            self.eval_report, self.eval_failed = graph.report(), graph.failed
            graph.close()
            self.amp = amp

    @torch.no_grad()
    def evaluate(self, val, arch_fn) -> dict:
        """Mean loss and accuracy over the validation split, :data:`EVAL_GROUP` consecutive batches per forward
        (half the forwards, and kernel launches, of one per batch; the cells' BNs take the statistics of the
        group), each under ``arch_fn()`` (see :meth:`evaluator`)."""
        tot, seen = self._totals(), 0
        with self.evaluator(arch_fn) as forward:
            for x, y in grouped(val, EVAL_GROUP):
                logits = forward(x).float()
                tot += torch.stack([self.criterion(logits, y).to(tot.dtype) * len(y),
                                    (logits.argmax(-1) == y).sum().to(tot.dtype)])
                seen += len(y)
        tot_loss, correct = tot.tolist()
        correct = int(correct)
        if self.ddp:
            tot_loss, correct, seen = distributed.sum_over_ranks((tot_loss, correct, seen), self.device)
        return dict(val_loss=tot_loss / seen, val_acc=correct / seen)

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), w_opt=self.w_opt.state_dict(), sched=self.sched.state_dict(),
                    **self.algorithm.state_dict(), **(self.budget.state_dict() if self.budget else {}))

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.w_opt.load_state_dict(state["w_opt"])
        self.algorithm.load_state_dict(state)
        if self.budget:
            self.budget.load_state_dict(state)
        self.sched.load_state_dict(state["sched"])
