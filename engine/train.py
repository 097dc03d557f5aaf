"""``ktnas train`` and ``ktnas evaluate``: train a genotype's network from scratch on a frozen stem's features,
export it as one module (stem + cells) that runs on raw images, and measure it on raw images.

Training follows DARTS' evaluation recipe (``train.py``): SGD (momentum 0.9, weight decay 3e-4), lr 0.025 with
cosine annealing to 0 over the epochs, batch 96, 600 epochs, drop path 0.2 scaled linearly by epoch, gradient
clipping at 5, an auxiliary head (weight 0.4) when asked. Inputs are the store's cached features (a random cached
view per sample each epoch, view 0 for the test split), or with ``on_the_fly`` the frozen stem run on augmented
images each step (random crop with padding + flip of the prepared images, drawn per (seed, sample, epoch)).

A run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one line per epoch),
``curves.png`` (every 10 epochs and at the end), ``checkpoint.pt`` (written atomically after every epoch: model,
optimiser, scheduler, RNG states, epoch, history) and, at the end, ``model.pt`` (see
:func:`ktnas.engine.network.load_model`). ``resume`` continues from the checkpoint and gives, on the CPU, the weights
of an uninterrupted run bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ktnas.cache.datasets import load_split
from ktnas.cache.errors import KtnasError, first_line
from ktnas.cache.precompute import DEFAULT_OUT, augment, resolve_device
from ktnas.cache.stems import get_stem
from ktnas.cache.store import open_store
from ktnas.cache.stream import FeatureLoader

from .runs import atomic_save, atomic_write_jsonl, atomic_write_text, rng_state, set_rng_state
from .network import build_network, load_model, save_model
from .spaces import load_genotype

__all__ = ["TrainConfig", "train", "evaluate", "load_model", "stem_of_store", "stem_images", "ImageBatches",
           "make_optimizer", "train_step", "run_epoch", "add_train_parser", "add_evaluate_parser"]


@dataclass
class TrainConfig:
    """Everything ``ktnas train`` takes; defaults are DARTS' evaluation recipe."""

    features: str = DEFAULT_OUT  # the feature store
    genotype: str = ""  # genotype.json
    out: str = "runs/train"
    layers: int | None = None  # DARTS: cells in all (20); NB201: cells per stage (5)
    channels: int | None = None  # DARTS: 36; NB201: 16
    epochs: int = 600
    batch_size: int = 96
    lr: float = 0.025
    momentum: float = 0.9
    weight_decay: float = 3e-4
    auxiliary: bool = False
    auxiliary_weight: float = 0.4
    drop_path: float = 0.2
    grad_clip: float = 5.0
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # stop after this many epochs in all, leaving a checkpoint to --resume
    device: str = "auto"
    limit: int | None = None  # first N samples of each split
    on_the_fly: bool = False  # run the stem on augmented images instead of reading cached features
    dataset: str | None = None  # images for --on-the-fly (default: the store's data set)
    data_root: str | None = None
    workers: int = 2
    progress: bool = True


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
class _ImageBatches:
    """On-the-fly batches: images of a split through the frozen stem (augmented for training). ``indices``: the
    samples used (default: the first ``n``); training batches follow a permutation of them seeded by
    (seed, epoch)."""

    def __init__(self, images, n, stem, batch_size, device, train, seed, indices=None):
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        self.images, self.n, self.stem, self.batch_size = images, len(self.indices), stem, batch_size
        self.device, self.train, self.seed, self.epoch = device, train, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = self.indices[np.random.default_rng([self.seed, self.epoch]).permutation(self.n)] if self.train \
            else self.indices
        for a in range(0, self.n, self.batch_size):
            idx = order[a:a + self.batch_size]
            x = self.stem.prepare(self.images.get_batch(torch.from_numpy(idx)).to(self.device))
            if self.train:
                x = augment(x, idx, self.epoch + 1, self.seed, "train")
            yield self.stem.forward_prepared(x), self.images.labels[torch.from_numpy(idx)].to(self.device)


ImageBatches = _ImageBatches


def stem_images(store, stem, split: str, dataset: str | None = None, data_root: str | None = None):
    """The images of ``split`` that ``store`` was built from, prepared for ``stem`` (``dataset`` defaults to the
    store's; images that differ from the store's are refused, naming the data set to pass)."""
    dataset = dataset or store.attrs.get("dataset")
    images = load_split(dataset, split, root=data_root, image_size=stem.preprocessing.image_size,
                        seed=int(store.attrs.get("seed", 0)))
    want = store.attrs.get("dataset_fingerprints", {}).get(split)
    if want is not None and images.fingerprint != want:
        raise KtnasError(f"the {split} images of {dataset} differ from those store {store.path} was built from "
                         f"({store.attrs.get('dataset')}): pass --dataset {store.attrs.get('dataset')}")
    return images


def _loaders(cfg, store, stem, device):
    """(train batches, test batches) of cached features, or of images through the stem with --on-the-fly."""
    n = {s: len(store.split(s)) if cfg.limit is None else min(cfg.limit, len(store.split(s)))
         for s in ("train", "test")}
    if not cfg.on_the_fly:
        kw = dict(batch_size=cfg.batch_size, device=device, seed=cfg.seed, workers=cfg.workers)
        return (FeatureLoader(store, "train", shuffle=True, view="random", indices=np.arange(n["train"]), **kw),
                FeatureLoader(store, "test", shuffle=False, view=0, indices=np.arange(n["test"]), **kw))
    return tuple(_ImageBatches(stem_images(store, stem, split, cfg.dataset, cfg.data_root), n[split], stem,
                               cfg.batch_size, device, split == "train", cfg.seed) for split in ("train", "test"))


# ------------------------------------------------------------------------------------------ checkpoints
def plot_curves(history: list[dict], path: Path):
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
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


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
    bar = tqdm(batches, desc=desc, leave=False, disable=not progress, file=sys.stderr, dynamic_ncols=True)
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


def _run_epoch(net, batches, device, optimizer=None, cfg=None, desc="", progress=False):
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
    if cfg.epochs < 1 or cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise KtnasError("--epochs, --batch-size and --limit must be positive integers")
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not cfg.resume:
        raise KtnasError(f"{out} already holds a training run (checkpoint.pt): pass --resume to continue it or "
                         "choose another --out")
    device = resolve_device(cfg.device)
    genotype = load_genotype(cfg.genotype)
    store = open_store(cfg.features)
    try:
        return _train(cfg, out, ckpt_path, device, genotype, store)
    finally:
        store.close()


def _train(cfg, out, ckpt_path, device, genotype, store) -> dict:
    attrs = store.attrs
    stem = stem_of_store(attrs, store.path).to(device)
    C_stem, H, _ = store.split("train").sample_shape[1:]
    network_config = dict(num_classes=int(attrs["num_classes"]), layers=cfg.layers, channels=cfg.channels,
                          auxiliary=cfg.auxiliary, in_channels=int(C_stem), in_size=int(H))
    torch.manual_seed(cfg.seed)
    net = build_network(genotype, **network_config).to(device)
    optimizer, scheduler = make_optimizer(net, cfg, cfg.epochs)
    train_batches, test_batches = _loaders(cfg, store, stem, device)

    start, history = 0, []
    if cfg.resume and ckpt_path.exists():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            net.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
        except Exception as e:
            reason = first_line(e)
            raise KtnasError(f"cannot resume from {ckpt_path} ({type(e).__name__}: {reason}): rerun with the "
                             "run's original arguments, or start afresh in another --out") from None
        if ck["config"]["epochs"] != cfg.epochs:
            raise KtnasError(f"{ckpt_path} was trained for --epochs {ck['config']['epochs']}, not {cfg.epochs}: "
                             "resume with the same --epochs")
        set_rng_state(ck["rng"])
        start, history = int(ck["epoch"]), list(ck["history"])

    out.mkdir(parents=True, exist_ok=True)
    layout = getattr(net, "layout", [])
    resolved = dict(asdict(cfg), network_config=network_config, layout=layout, genotype_json=genotype.to_json(),
                    device_resolved=str(device), stem=dict(spec=stem.spec, weights=stem.weights_source,
                                                           fingerprint=stem.fingerprint,
                                                           preprocessing=stem.preprocessing.to_dict()),
                    dataset=attrs.get("dataset"), parameters=sum(p.numel() for p in net.parameters()))
    atomic_write_text(out / "config.json", json.dumps(resolved, indent=1) + "\n")

    end = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.epochs, desc="train", unit="epoch",
               disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            net.drop_path_prob = cfg.drop_path * epoch / cfg.epochs
            train_batches.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            tr_loss, tr_acc = _run_epoch(net, train_batches, device, optimizer, cfg, f"epoch {epoch + 1}", cfg.progress)
            te_loss, te_acc = _run_epoch(net, test_batches, device, desc="test", progress=cfg.progress)
            scheduler.step()
            history.append(dict(epoch=epoch + 1, lr=lr, drop_path=net.drop_path_prob, train_loss=tr_loss,
                                train_acc=tr_acc, test_loss=te_loss, test_acc=te_acc,
                                seconds=time.perf_counter() - t0))
            bar.set_postfix(train=f"{tr_acc:.1f}", test=f"{te_acc:.1f}")
            atomic_write_jsonl(out / "metrics.jsonl", history)
            atomic_save(dict(model=net.state_dict(), optimizer=optimizer.state_dict(),
                              scheduler=scheduler.state_dict(), rng=rng_state(), epoch=epoch + 1,
                              history=history, config=asdict(cfg)), ckpt_path)
            if epoch + 1 == end or (epoch + 1) % 10 == 0:  # matplotlib costs a good part of a small epoch
                plot_curves(history, out / "curves.png")
    finally:
        bar.close()
        for b in (train_batches, test_batches):
            getattr(b, "close", lambda: None)()

    summary = dict(out=str(out), epochs_done=len(history), history=history, network_config=network_config,
                   layout=layout, test_acc=history[-1]["test_acc"] if history else None,
                   checkpoint=str(ckpt_path), model=None)
    if len(history) == cfg.epochs:
        meta = dict(dataset=attrs.get("dataset"), classes=attrs.get("classes"), test_acc=summary["test_acc"],
                    epochs=cfg.epochs, store=store.path, seed=int(attrs.get("seed", 0)))
        save_model(out / "model.pt", stem.cpu(), net.cpu(), genotype, network_config, meta)
        summary["model"] = str(out / "model.pt")
    return summary


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: str, dataset: str | None = None, split: str = "test", *, limit: int | None = None,
             batch_size: int = 256, data_root: str | None = None, device: str = "auto",
             progress: bool = False) -> dict:
    """Accuracy and loss of an exported model (``model.pt``) on the raw images of a data set's split."""
    dev = resolve_device(device)
    net = load_model(model).to(dev)
    dataset = dataset or net.meta.get("dataset")
    if not dataset:
        raise KtnasError(f"{model} records no data set: pass --dataset")
    data = load_split(dataset, split, root=data_root, image_size=net.stem.preprocessing.image_size,
                      seed=int(net.meta.get("seed", 0)))
    n = len(data) if limit is None else min(int(limit), len(data))
    if n < 1 or batch_size < 1:
        raise KtnasError(f"nothing to evaluate ({n} images, batch size {batch_size}): pass positive --limit and "
                         "--batch-size")
    loss_sum, correct = 0.0, 0
    for a in tqdm(range(0, n, batch_size), desc="evaluate", disable=not progress, file=sys.stderr):
        b = min(n, a + batch_size)
        images, labels = data.get_batch(slice(a, b)).to(dev), data.labels[a:b]
        logits = net(images).cpu()
        if int(labels.max()) >= logits.shape[1]:
            raise KtnasError(f"{dataset} has labels up to {int(labels.max())}, the model predicts "
                             f"{logits.shape[1]} classes: evaluate it on the data set it was trained for")
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    return dict(model=str(model), dataset=dataset, split=split, n=n, correct=correct, accuracy=100.0 * correct / n,
                loss=loss_sum / n)


# -------------------------------------------------------------------------------------------------- CLI
def cmd_train(args) -> int:
    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)})
    cfg.progress = not args.quiet
    s = train(cfg)
    h = s["history"][-1] if s["history"] else {}
    done = f"model {s['model']}" if s["model"] else f"stopped after epoch {s['epochs_done']}: continue with --resume"
    print(f"{s['out']}: {s['epochs_done']}/{cfg.epochs} epochs, train accuracy {h.get('train_acc', 0):.2f}%, "
          f"test accuracy {h.get('test_acc', 0):.2f}% (cached features, view 0); {done}")
    return 0


def cmd_evaluate(args) -> int:
    r = evaluate(args.model, args.dataset, args.split, limit=args.limit, batch_size=args.batch_size,
                 data_root=args.data_root, device=args.device, progress=not args.quiet)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} on {r['dataset']} {r['split']} ({r['n']} images): accuracy {r['accuracy']:.2f}% "
              f"({r['correct']}/{r['n']}), loss {r['loss']:.4f}")
    return 0


def add_train_parser(subparsers):
    """The ``train`` subcommand."""
    d = TrainConfig()
    s = subparsers.add_parser("train", help="train a genotype's network on cached features and export it")
    s.add_argument("--features", default=d.features, help="feature store (default: %(default)s)")
    s.add_argument("--genotype", required=True, help="genotype.json (DARTS or NAS-Bench-201)")
    s.add_argument("--out", required=True, help="run directory (config, metrics, checkpoint, curves, model.pt)")
    s.add_argument("--layers", type=int, default=None, help="DARTS: cells of the full network (20, the stem "
                                                            "replaces the first ones); NB201: cells per stage (5)")
    s.add_argument("--channels", type=int, default=None, help="first width of the full network (DARTS 36, NB201 16)")
    s.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    s.add_argument("--lr", type=float, default=d.lr, help="initial lr, cosine to 0 (default: %(default)s)")
    s.add_argument("--momentum", type=float, default=d.momentum)
    s.add_argument("--weight-decay", type=float, default=d.weight_decay)
    s.add_argument("--auxiliary", action="store_true", help="auxiliary head at 2/3 depth (DARTS)")
    s.add_argument("--auxiliary-weight", type=float, default=d.auxiliary_weight)
    s.add_argument("--drop-path", type=float, default=d.drop_path, help="final drop path prob (default: %(default)s)")
    s.add_argument("--grad-clip", type=float, default=d.grad_clip)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    s.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (resume later)")
    s.add_argument("--device", default=d.device, help="auto | cpu | cuda (default: auto)")
    s.add_argument("--limit", type=int, default=None, help="first N samples of each split only")
    s.add_argument("--on-the-fly", action="store_true", help="run the frozen stem on augmented images each step")
    s.add_argument("--dataset", default=None, help="images for --on-the-fly (default: the store's data set)")
    s.add_argument("--data-root", default=None, help="folder with the data set's files")
    s.add_argument("--workers", type=int, default=d.workers, help="feature reader threads")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_train)
    return s


def add_evaluate_parser(subparsers):
    """The ``evaluate`` subcommand."""
    s = subparsers.add_parser("evaluate", help="accuracy of an exported model.pt on raw images")
    s.add_argument("--model", required=True, help="model.pt written by ktnas train")
    s.add_argument("--dataset", default=None, help="data set (default: the one the model was trained on)")
    s.add_argument("--split", default="test", choices=("train", "test"))
    s.add_argument("--limit", type=int, default=None, help="first N images only")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--data-root", default=None, help="folder with the data set's files")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_evaluate)
    return s
