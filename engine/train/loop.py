"""``ktnas train``: train a genotype's network from scratch on a frozen stem's features and export it as one module
(stem + cells) that runs on raw images.

Training follows DARTS' evaluation recipe (``train.py``): SGD (momentum 0.9, weight decay 3e-4), lr 0.025 with
cosine annealing to 0 over the epochs, batch 96, 600 epochs, drop path 0.2 scaled linearly by epoch, gradient
clipping at 5, an auxiliary head (weight 0.4) when asked. Inputs are the store's cached features (a random cached
view per sample each epoch, view 0 for the test split), or with ``on_the_fly`` the frozen stem run on augmented
images each step. The run directory (``ktnas.engine.runs.RunDir``) holds ``config.json``, ``metrics.jsonl``,
``curves.png``, ``checkpoint.pt`` and, at the end, ``model.pt``; ``resume`` continues bit for bit on the CPU.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from ktnas.cache.errors import KtnasError
from ktnas.cache.classes import relabel
from ktnas.cache.datasets import augment, load_split
from ktnas.cache.runtime import DEFAULT_OUT, resolve_device
from ktnas.cache.stems import get_stem
from ktnas.cache.store import open_store
from ktnas.cache.stream import FeatureLoader

from ktnas.engine import runs
from ktnas.engine.data import ImageBatches
from ktnas.engine.train.evaluate import add_evaluate_parser, evaluate
from ktnas.cache.flags import add_config_arguments, check_positive, config_from_args, option
from ktnas.engine.train.network import build_network, load_model, network_config, save_model
from ktnas.engine.runs import RunDir, atomic_write, progress, set_rng_state
from ktnas.engine.genotypes import parse_genotype

__all__ = ["TrainConfig", "train", "evaluate", "load_model", "stem_of_store", "stem_images", "stem_batches",
           "make_optimizer", "train_step", "run_epoch", "add_train_parser", "add_evaluate_parser"]


@dataclass
class TrainConfig:
    """Everything ``ktnas train`` takes; defaults are DARTS' evaluation recipe."""

    features: str = option(DEFAULT_OUT, "feature store")
    genotype: str = option("", "genotype.json, DARTS Genotype(...) text or FILE[:NAME], or an NB201 "
                               "architecture string", required=True)
    out: str = option("runs/train", "run directory (config, metrics, checkpoint, curves, model.pt)", required=True)
    layers: int | None = option(None, "cells the network is built with (NB201: its ResNet blocks included); "
                                      "default: the paper's (DARTS 20, NB201 17) minus the cells the stem replaces")
    channels: int | None = option(None, "width of the first cells (default: DARTS 36, NB201 16, doubled per stage "
                                        "the stem replaces)")
    epochs: int = 600
    batch_size: int = 96
    lr: float = option(0.025, "initial lr, cosine to 0")
    momentum: float = 0.9
    weight_decay: float = 3e-4
    auxiliary: bool = option(False, "auxiliary head after the last reduction cell (DARTS)")
    auxiliary_weight: float = 0.4
    drop_path: float = option(0.2, "final drop path prob")
    grad_clip: float = 5.0
    seed: int = 0
    resume: bool = option(False, "continue the run in --out from its checkpoint")
    stop_after: int | None = option(None, "stop after this many epochs (resume later)")
    device: str = option("auto", "auto | cpu | cuda")
    limit: int | None = option(None, "first N samples of each split only")
    on_the_fly: bool = option(False, "run the frozen stem on augmented images each step")
    dataset: str | None = option(None, "images for --on-the-fly (default: the store's data set)")
    data_root: str | None = option(None, "folder with the data set's files")
    workers: int = option(2, "feature reader threads")
    progress: bool = option(True, "no progress bars", flag="quiet")


NOT_COMPARED = ("stop_after", "device", "workers")  # a resumed run may change these (and out, resume, progress)


# ------------------------------------------------------------------------------------------------- stems
def stem_of_store(attrs: dict, path: str = "the store"):
    """The frozen stem that made a store (its spec, weights, preprocessing), checked against its fingerprint."""
    src = str(attrs.get("weights", "imagenet"))
    weights = "imagenet" if src.startswith("imagenet") else "none" if src == "none" else \
        src[len("file:"):] if src.startswith("file:") else src
    pre = attrs.get("preprocessing", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'none' weights warn at precompute time already
        stem = get_stem(attrs["stem"], weights, pre.get("image_size", 64), pre.get("mean"), pre.get("std"))
    if stem.fingerprint != attrs.get("stem_fingerprint"):
        raise KtnasError(f"the stem rebuilt from {path} ({attrs['stem']}, weights {src}) has fingerprint "
                         f"{stem.fingerprint[:12]}, the store records {str(attrs.get('stem_fingerprint'))[:12]}: "
                         "use the weights the store was built with, or precompute the store again")
    return stem



# ---------------------------------------------------------------------------------------------- batches
def stem_batches(images, stem, indices, batch_size: int, device, train: bool, seed: int) -> ImageBatches:
    """Images of a split through the frozen stem (augmented for training, then in an order seeded by
    (seed, epoch)); ``indices``: the samples used."""
    def fetch(idx, epoch):
        x = stem.prepare(images.get_batch(idx).to(device))
        if train:
            x = augment(x, idx.numpy(), epoch + 1, seed, "train")
        return stem.forward_prepared(x), images.labels[idx]
    return ImageBatches(fetch, indices, batch_size, seed=seed, device=device, shuffle=train, key=())


def stem_images(store, stem, split: str, dataset: str | None = None, data_root: str | None = None):
    """The images of ``split`` that ``store`` was built from, prepared for ``stem`` (``dataset`` defaults to the
    store's; images that differ from the store's are refused, naming the data set to pass)."""
    dataset = dataset or store.attrs.get("dataset")
    images = load_split(dataset, split, root=data_root, image_size=stem.preprocessing.image_size,
                        seed=int(store.attrs.get("seed", 0)))
    if store.attrs.get("classes"):  # an image folder's class folders onto the store's classes, by name
        images = relabel(images, list(store.attrs["classes"]), f"store {store.path}")
    want = store.attrs.get("dataset_fingerprints", {}).get(split)
    if want is not None and images.fingerprint != want:
        raise KtnasError(f"the {split} images of {dataset} differ from those store {store.path} was built from "
                         f"({store.attrs.get('dataset')}): pass --dataset {store.attrs.get('dataset')}")
    return images


def loaders(cfg, store, stem, device):
    """(train batches, test batches) of cached features, or of images through the stem with --on-the-fly."""
    n = {s: len(store.split(s)) if cfg.limit is None else min(cfg.limit, len(store.split(s)))
         for s in ("train", "test")}
    if not cfg.on_the_fly:
        kw = dict(batch_size=cfg.batch_size, device=device, seed=cfg.seed, workers=cfg.workers)
        return (FeatureLoader(store, "train", shuffle=True, view="random", indices=np.arange(n["train"]), **kw),
                FeatureLoader(store, "test", shuffle=False, view=0, indices=np.arange(n["test"]), **kw))
    return tuple(stem_batches(stem_images(store, stem, split, cfg.dataset, cfg.data_root), stem,
                              np.arange(n[split]), cfg.batch_size, device, split == "train", cfg.seed)
                 for split in ("train", "test"))


def plot_curves(history: list[dict], path):
    """Train/test accuracy and loss over epochs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "acc", "accuracy (%)"), (axes[1], "loss", "loss")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", ms=3, label="train")
        ax.plot(ep, [h[f"test_{key}"] for h in history], "o-", ms=3, label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


# --------------------------------------------------------------------------------------------- training
def make_optimizer(net, cfg, t_max):
    """DARTS' optimiser for ``net``: SGD (cfg.lr, momentum, weight decay) and cosine annealing to 0 over ``t_max``
    scheduler steps (epochs for ``ktnas train``, optimiser steps for ``ktnas evolve``)."""
    optimizer = torch.optim.SGD(net.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(t_max))


def train_step(net, x, y, optimizer, cfg):
    """One optimiser step of ``net`` on the batch (x, y): cross-entropy (+ cfg.auxiliary_weight x the auxiliary
    head's when it has one), gradients clipped to cfg.grad_clip. Returns (loss, logits), detached."""
    logits, logits_aux = net(x)
    loss = nn.functional.cross_entropy(logits, y)
    total = loss + cfg.auxiliary_weight * nn.functional.cross_entropy(logits_aux, y) if logits_aux is not None \
        else loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach(), logits.detach()


def run_epoch(nets, batches, device, optimizers=None, cfg=None, *, schedulers=None, streams=None, desc="",
              progress=False, check_finite=True) -> list[tuple[float, float]]:
    """One pass of several networks in lock-step over the same batches (each batch is read, and with
    --on-the-fly run through the stem, once for all of them): trains when ``optimizers`` are given (one
    :func:`train_step` per network and batch, then its scheduler's step when ``schedulers`` are given), else
    evaluates. ``streams``: one CUDA stream per network, so that the small networks' kernels overlap on the GPU.
    Returns one (mean loss, accuracy %) per network; a non-finite training loss is a KtnasError when
    ``check_finite``."""
    training = optimizers is not None
    for net in nets:
        net.train(training)
    sums = [[torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device)]
            for _ in nets]
    count = 0
    bar = runs.progress(batches, desc=desc, leave=False, enabled=progress)
    with torch.set_grad_enabled(training):
        for x, y in bar:
            x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
            for k, net in enumerate(nets):
                if streams is not None:
                    streams[k].wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(streams[k]) if streams is not None else contextlib.nullcontext():
                    if training:
                        loss, logits = train_step(net, x, y, optimizers[k], cfg)
                        if schedulers is not None:
                            schedulers[k].step()
                    else:
                        logits = net(x)[0]
                        loss = nn.functional.cross_entropy(logits, y)
                    sums[k][0] += loss.double() * len(y)
                    sums[k][1] += (logits.argmax(1) == y).sum()
            if streams is not None:
                for s in streams:
                    torch.cuda.current_stream(device).wait_stream(s)
            count += len(y)
            if progress and len(nets) == 1:
                bar.set_postfix(loss=f"{float(sums[0][0]) / count:.3f}", acc=f"{100 * int(sums[0][1]) / count:.1f}")
    out = [(float(loss_sum) / count, 100.0 * int(correct) / count) for loss_sum, correct in sums]
    if training and check_finite:
        for loss, _ in out:
            if not math.isfinite(loss):
                raise KtnasError(f"training diverged (loss {loss}): lower --lr or --grad-clip")
    return out


def one_epoch(net, batches, device, optimizer=None, cfg=None, desc="", progress=False):
    """One pass: trains when ``optimizer`` is given, else evaluates. Returns (mean loss, accuracy %)."""
    return run_epoch([net], batches, device, None if optimizer is None else [optimizer], cfg, desc=desc,
                     progress=progress)[0]


def train(cfg: TrainConfig | None = None, **overrides) -> dict:
    """Train the genotype's network on the store's features (see the module docstring); returns a summary with
    the per-epoch history, the final test accuracy and the paths written."""
    cfg = cfg or TrainConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if not cfg.genotype:
        raise KtnasError("no genotype given: pass --genotype RUN/genotype.json (written by ktnas search)")
    check_positive(cfg, ("epochs", "batch_size") + (() if cfg.limit is None else ("limit",)))
    files = RunDir(cfg.out, "training run", resume=cfg.resume, ignore=NOT_COMPARED)
    state = files.read_checkpoint()
    device = resolve_device(cfg.device)
    genotype = parse_genotype(cfg.genotype)
    store = open_store(cfg.features)
    try:
        return _train(cfg, files, state, device, genotype, store)
    finally:
        store.close()


class TrainingRun:
    """One training run: the network, its optimiser and schedule, its batches and history (resumed from
    ``state`` when given)."""

    def __init__(self, cfg, files, state, device, genotype, store):
        attrs = store.attrs
        self.cfg, self.files, self.device, self.genotype, self.store = cfg, files, device, genotype, store
        self.stem = stem_of_store(attrs, store.path).to(device)
        C_stem, H, _ = store.split("train").sample_shape[1:]
        self.network_config = network_config(genotype, int(attrs["num_classes"]), auxiliary=cfg.auxiliary,
                                              in_channels=int(C_stem), in_size=int(H), layers=cfg.layers,
                                              channels=cfg.channels)
        torch.manual_seed(cfg.seed)
        self.net = build_network(genotype, **self.network_config).to(device)
        self.optimizer, self.scheduler = make_optimizer(self.net, cfg, cfg.epochs)
        self.batches = loaders(cfg, store, self.stem, device)
        self.start, self.history = 0, []
        if state is not None:
            files.check_config(state["config"], asdict(cfg))
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            self.start, self.history = int(state["epoch"]), list(state["history"])

    def write_config(self):
        stem, attrs = self.stem, self.store.attrs
        self.files.write_json("config.json", dict(
            asdict(self.cfg), network_config=self.network_config, layout=getattr(self.net, "layout", []),
            genotype_json=self.genotype.to_json(), device_resolved=str(self.device),
            stem=dict(spec=stem.spec, weights=stem.weights_source, fingerprint=stem.fingerprint,
                      preprocessing=stem.preprocessing.to_dict()),
            dataset=attrs.get("dataset"), parameters=sum(p.numel() for p in self.net.parameters())))

    def epoch(self, epoch: int) -> dict:
        cfg, net, (train_batches, test_batches) = self.cfg, self.net, self.batches
        t0 = time.perf_counter()
        net.drop_path_prob = cfg.drop_path * epoch / cfg.epochs
        train_batches.set_epoch(epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        tr_loss, tr_acc = one_epoch(net, train_batches, self.device, self.optimizer, cfg, f"epoch {epoch + 1}",
                                    cfg.progress)
        te_loss, te_acc = one_epoch(net, test_batches, self.device, desc="test", progress=cfg.progress)
        self.scheduler.step()
        self.history.append(dict(epoch=epoch + 1, lr=lr, drop_path=net.drop_path_prob, train_loss=tr_loss,
                                 train_acc=tr_acc, test_loss=te_loss, test_acc=te_acc,
                                 seconds=time.perf_counter() - t0))
        self.files.write_jsonl("metrics.jsonl", self.history)
        self.files.save_checkpoint(dict(model=net.state_dict(), optimizer=self.optimizer.state_dict(),
                                        scheduler=self.scheduler.state_dict(), epoch=epoch + 1,
                                        history=self.history), asdict(cfg))
        return self.history[-1]

    def close(self):
        for b in self.batches:
            getattr(b, "close", lambda: None)()


def _train(cfg, files, state, device, genotype, store) -> dict:
    run = TrainingRun(cfg, files, state, device, genotype, store)
    run.write_config()
    end = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    bar = progress(range(run.start, end), initial=run.start, total=cfg.epochs, desc="train", unit="epoch",
                   enabled=cfg.progress)
    try:
        for epoch in bar:
            rec = run.epoch(epoch)
            bar.set_postfix(train=f"{rec['train_acc']:.1f}", test=f"{rec['test_acc']:.1f}")
            if epoch + 1 == end or (epoch + 1) % 10 == 0:  # matplotlib costs a good part of a small epoch
                plot_curves(run.history, files.file("curves.png"))
    finally:
        bar.close()
        run.close()
    history = run.history
    summary = dict(out=str(files.path), epochs_done=len(history), history=history,
                   network_config=run.network_config, layout=getattr(run.net, "layout", []),
                   test_acc=history[-1]["test_acc"] if history else None,
                   checkpoint=str(files.checkpoint_path), model=None)
    if len(history) == cfg.epochs:
        attrs = store.attrs
        meta = dict(dataset=attrs.get("dataset"), classes=attrs.get("classes"), test_acc=summary["test_acc"],
                    epochs=cfg.epochs, store=store.path, seed=int(attrs.get("seed", 0)))
        save_model(files.file("model.pt"), run.stem.cpu(), run.net.cpu(), genotype, run.network_config, meta)
        summary["model"] = str(files.file("model.pt"))
    return summary


# -------------------------------------------------------------------------------------------------- CLI
def cmd_train(args) -> int:
    cfg = config_from_args(TrainConfig, args)
    s = train(cfg)
    h = s["history"][-1] if s["history"] else {}
    done = f"model {s['model']}" if s["model"] else f"stopped after epoch {s['epochs_done']}: continue with --resume"
    print(f"{s['out']}: {s['epochs_done']}/{cfg.epochs} epochs, train accuracy {h.get('train_acc', 0):.2f}%, "
          f"test accuracy {h.get('test_acc', 0):.2f}% (cached features, view 0); {done}")
    return 0


def add_train_parser(subparsers):
    """The ``train`` subcommand."""
    s = subparsers.add_parser("train", help="train a genotype's network on cached features and export it")
    add_config_arguments(s, TrainConfig)
    s.set_defaults(func=cmd_train)
    return s
