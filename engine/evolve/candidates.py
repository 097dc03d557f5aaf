"""The candidates of ``ktnas evolve``: each genotype's evaluation network at a proxy size, trained from scratch
by ``ktnas train``'s own step on the search-train part of a store's train split and measured on its
search-validation part; several in lock-step on the same batches (each on its own CUDA stream on a GPU).
``classic=True`` trains the same candidates the classic way instead (``ktnas bench ranking``): the whole proxy
network with its own conv stem on the store's images (as ``ktnas search --stem none`` reads them), same samples,
split and recipe."""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from ktnas.cache.errors import KtnasError
from ktnas.cache.stream import FeatureLoader

from ktnas.engine.data import ImageBatches, classic_images, split_indices
from ktnas.engine.layout import resolve_layout
from ktnas.engine.train.network import build_network
from ktnas.engine.evolve.predictor import TAG_INIT, derive_seed
from ktnas.engine.spaces import genotype_str, get_space
from ktnas.engine.train.loop import TrainConfig, make_optimizer, run_epoch, stem_batches, stem_images, stem_of_store



class CandidateTrainer:
    """Trains candidate networks on the search-train part of a store's train split and measures them on its
    search-validation part; :meth:`train` takes a group and runs it in lock-step (see the module docstring)."""

    def __init__(self, cfg, store, device, classic: bool = False):
        self.cfg, self.device = cfg, torch.device(device)
        attrs = store.attrs
        sp = store.split("train")
        n = sp.shape[0] if cfg.limit is None else min(cfg.limit, sp.shape[0])
        if n < 2:
            raise KtnasError(f"store {store.path} has {n} training sample(s): evolve needs 2 or more (one to train "
                             "on, one to validate on)")
        tr, va = split_indices(n, cfg.seed, cfg.train_portion)
        images = classic_images(store, n, cfg.data_root) if classic else None
        C, H, W = (int(v) for v in (images[0].shape[1:] if classic else sp.shape[2:]))
        self.shape = (C, H, W)
        space = get_space(cfg.space)  # its proxy network's size when --layers/--channels are not given
        layout = resolve_layout(space, None if classic else H, "eval", layers=cfg.layers,
                                channels=cfg.channels, reference=space.proxy)
        self.network_config = dict(num_classes=int(attrs["num_classes"]), **layout.as_dict(),
                                   in_channels=None if classic else C, in_size=None if classic else H)
        source = ("images, classic conv stem" if classic else
                  "images through the frozen stem" if cfg.on_the_fly else "cached features")
        self.data = dict(train=len(tr), val=len(va), shape=[C, H, W], stem=attrs.get("stem"),
                         fingerprint=attrs.get("stem_fingerprint"), dataset=attrs.get("dataset"), source=source)
        val_batch = max(cfg.batch_size, 256)  # measuring in eval mode: the batch size only sets the speed
        if classic:
            x, y = images
            self.train_batches = ImageBatches.of_tensors(x, y, tr, cfg.batch_size, cfg.seed, self.device)
            self.val_batches = ImageBatches.of_tensors(x, y, va, val_batch, cfg.seed + 1, self.device)
        elif cfg.on_the_fly:
            stem = stem_of_store(attrs, store.path).to(self.device)
            images = stem_images(store, stem, "train", cfg.dataset, cfg.data_root)
            self.train_batches = stem_batches(images, stem, tr, cfg.batch_size, self.device, True, cfg.seed)
            self.val_batches = stem_batches(images, stem, va, val_batch, self.device, False, cfg.seed)
        else:
            kw = dict(device=self.device, seed=cfg.seed, workers=cfg.workers)
            self.train_batches = FeatureLoader(store, "train", batch_size=cfg.batch_size, shuffle=True, view="random",
                                               indices=tr, **kw)
            self.val_batches = FeatureLoader(store, "train", batch_size=val_batch, shuffle=False, view=0, indices=va,
                                             **kw)
        self.tcfg = TrainConfig(features="", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                grad_clip=cfg.grad_clip, epochs=cfg.epochs_per_candidate, batch_size=cfg.batch_size,
                                auxiliary=False, drop_path=0.0, seed=cfg.seed)

    def build(self, genotype, index: int) -> nn.Module:
        """Candidate ``index``'s network, its initial weights drawn from a seed of (seed, index)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.seed, index, TAG_INIT))
            return build_network(genotype, **self.network_config).to(self.device)

    @torch.no_grad()
    def flops(self, net: nn.Module) -> int:
        """Forward FLOPs of one sample (a multiply-add counts 2), as counted by torch's FlopCounterMode."""
        from torch.utils.flop_counter import FlopCounterMode

        net.eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, *self.shape, device=self.device))
        return int(counter.get_total_flops())

    def train(self, genotypes, indices) -> list[dict]:
        """Train the candidates ``genotypes`` (numbered ``indices``) together; one result dict per candidate."""
        nets = [self.build(g, i) for g, i in zip(genotypes, indices)]
        flops = [self.flops(net) for net in nets]
        t0 = time.perf_counter()
        steps = self.cfg.epochs_per_candidate * len(self.train_batches)
        optimizers, schedulers = zip(*(make_optimizer(net, self.tcfg, steps) for net in nets))
        streams = [torch.cuda.Stream(self.device) for _ in nets] \
            if self.device.type == "cuda" and len(nets) > 1 else None
        for epoch in range(self.cfg.epochs_per_candidate):
            self.train_batches.set_epoch(epoch)
            train = run_epoch(nets, self.train_batches, self.device, list(optimizers), self.tcfg,
                              schedulers=list(schedulers), streams=streams, check_finite=False)
        val = run_epoch(nets, self.val_batches, self.device, streams=streams)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        rows = []
        for i, g, net, f, (tl, ta), (vl, vacc) in zip(indices, genotypes, nets, flops, train, val):
            rows.append(dict(index=int(i), arch=genotype_str(g), genotype=g.to_json(), val_acc=vacc,
                             val_loss=vl if math.isfinite(vl) else None, train_acc=ta,
                             train_loss=tl if math.isfinite(tl) else None, diverged=not math.isfinite(tl),
                             params=sum(p.numel() for p in net.parameters()), flops=f,
                             seconds=seconds / len(nets), group_seconds=seconds, group_size=len(nets)))
        return rows

    def close(self):
        for b in (self.train_batches, self.val_batches):
            getattr(b, "close", lambda: None)()
