"""``ktnas search``: differentiable / one-shot architecture search on cached stem features (or raw images).

One Python call, :func:`search` (``SearchConfig`` -> summary dict); the CLI maps its flags onto the config.

Data: the store's (or data set's) train split, optionally its first ``limit`` samples, is split by a permutation
seeded by ``seed`` into search-train (the first ``train_portion``) and search-validation, both streamed with
``FeatureLoader(indices=...)``. With ``stem='none'`` the images are held in memory as floats in [0, 1],
normalised by the per-channel mean and std of the samples used (1-channel images repeated to 3). The batch order of each
epoch depends on (seed, epoch) only (``FeatureLoader.set_epoch``); every random draw of the algorithms (Gumbel
noise, random architectures) comes from generators seeded by (seed, epoch), so a resumed run is bit-identical.

Algorithms (hyper-parameter defaults are the papers'; ``None`` fields take them, see ``PAPER_DEFAULTS``):

- ``darts``: per step, an Adam step of the alphas on a validation batch, then an SGD step of the weights on a
  training batch. ``order=1`` uses the plain validation gradient; ``order=2`` DARTS' Architect: the gradient at
  the one-step unrolled weights w' = w - eta (momentum buffer * momentum + dL_train/dw + wd w), eta the current
  weight learning rate, minus eta times the Hessian-vector product by central finite differences with
  R = 1e-2 / ||dL_val/dw'||.
- ``pcdarts``: darts (order 1 by default) with partial channels (K=4: 1/K of each edge's channels go through
  the mixed op, the rest bypass it, then channel shuffle) and edge normalisation (``beta_*``, a softmax per
  node over its incoming edges). The alphas are frozen for the first ``warmup`` epochs: PC-DARTS' 15 of 50
  epochs; for other epoch counts the same fraction, floor(0.3 * epochs) (so 0 for 1-3 epochs).
- ``gdas``: per step, a Gumbel-softmax hard sample per edge (straight-through weights ``one_hot - p.detach() +
  p``, temperature tau linear from ``tau_max`` = 10 at the first epoch to ``tau_min`` = 0.1 at the last), only
  the sampled op computed; an SGD step of the weights on a training batch, then an Adam step of the alphas on a
  validation batch, each under its own sample (AutoDL's order). Defaults are NAS-Bench-201's GDAS settings.
- ``random``: random search with weight sharing: each step trains the weights under a uniformly drawn genotype
  (``random_genotype``: one op per chosen edge, the others 'none'); after the last epoch ``candidates`` (100)
  random genotypes are evaluated on the whole search-validation split and the most accurate one is the result
  (its one-hot encoding is stored as the final alphas; earlier epochs keep the untrained, uniform alphas).

Per epoch the run directory gets ``metrics.jsonl`` (losses, accuracies, seconds, peak memory, entropy, skips,
genotype), ``alphas.npz`` (``<cell type>_eNNN``), ``genotype.json`` and ``checkpoint.pt`` (atomic); at the end
``alphas.png`` and the cell pictures (``normal.png``/``reduce.png`` or ``cell.png``). ``config.json`` holds the
resolved configuration.

Data parallel (``torchrun --nproc-per-node=N -m ktnas.engine.cli search ...``): with RANK, WORLD_SIZE and
LOCAL_RANK in the environment, :func:`search` initialises the default process group (nccl on CUDA, each rank on
cuda:LOCAL_RANK; gloo on the CPU) and destroys it at the end. Every rank streams its partition of the
search-train and search-validation indices (``FeatureLoader`` rank/world_size; the image path slices its
permutation the same way), so ``batch_size`` is per rank and the effective batch is batch_size x world_size
(the learning rates are not rescaled). After every backward the gradients of the weights and of the
architecture parameters (alphas, PC-DARTS betas) are averaged over the ranks by :func:`all_reduce_grads`; the
unrolled second-order step averages each of its gradients (:func:`all_reduce_mean`). The initial weights are
broadcast from rank 0; every random draw (Gumbel noise, random architectures, candidates) comes from
generators seeded by (seed, epoch) alone, so all ranks draw the same. Losses and accuracies are summed over the
ranks before they are divided (``peak_memory_bytes`` is the largest rank's). Only rank 0 writes the run
directory; with ``--resume`` rank 0 reads the checkpoint and broadcasts it. After every epoch the ranks
compare hashes of their architecture parameters, weights and genotype (a KtnasError if they differ); each
metrics record holds ``world_size`` and ``rank_alpha_hashes`` (one per rank).

``--max-memory SIZE`` (CUDA only): before the search, the largest batch size in [1, batch_size] whose trial
step (the algorithm's architecture and weight steps on random inputs of the data's shape) keeps
``torch.cuda.max_memory_allocated`` within SIZE is found by binary search (out of memory counts as too big;
under torchrun the smallest choice of the ranks); it is printed and recorded as ``batch_size_chosen`` in
``config.json``. A resumed run keeps its checkpoint's batch size.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ktnas.cache.errors import KtnasError
from ktnas.kernels import resolve_impl

from .spaces import (DartsGenotype, _parse_darts, alpha_entropy, count_skips, derive_darts, derive_nb201,
                     genotype_from_json, get_space, load_genotype, random_genotype)
from .runs import atomic_save, atomic_write, atomic_write_jsonl, peak_memory, rng_state, set_rng_state
from .supernet import Supernet, classic_layout, count_parameters, default_reductions, kt_layout

ALGOS = ("darts", "pcdarts", "gdas", "random")
_DARTS = dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, weight_decay=3e-4, nesterov=False, arch_lr=3e-4)
PAPER_DEFAULTS = {
    "darts": _DARTS,                                            # DARTS (Liu et al. 2019), train_search.py
    "pcdarts": dict(_DARTS, batch_size=256, lr=0.1, lr_min=0.0, arch_lr=6e-4),  # PC-DARTS train_search.py
    "gdas": dict(epochs=250, batch_size=64, lr=0.025, lr_min=0.001, weight_decay=5e-4, nesterov=True,
                 arch_lr=3e-4),                                 # NAS-Bench-201's GDAS config
    "random": _DARTS,                                           # RS-WS (Li & Talwalkar) trains as DARTS
}
PC_WARMUP, PC_EPOCHS = 15, 50


@dataclass
class SearchConfig:
    """Everything ``ktnas search`` takes. ``None`` means: the algorithm's paper default (``PAPER_DEFAULTS``),
    or for the layout, the classic network (``stem='none'``) or ``kt_layout`` of the stem's resolution.
    ``layers`` given without ``reductions`` (and unlike the default's) places them by DARTS' rule (layers//3,
    2*layers//3; NB201: two ResNet blocks splitting three equal stages)."""
    features: str | None = None        # feature store path (stem 'features')
    out: str = "runs/search"
    space: str = "darts"               # darts | nb201
    algo: str = "darts"                # darts | pcdarts | gdas | random
    order: int = 1                     # darts / pcdarts: 1 first order, 2 unrolled (DARTS' Architect)
    stem: str = "features"             # features (the store's frozen stem) | none (classic conv stem on images)
    dataset: str | None = None         # stem 'none': a ktnas.cache.datasets name
    data_root: str | None = None
    image_size: int = 32               # stem 'none', imagefolder sets only
    epochs: int | None = None
    batch_size: int | None = None      # per rank under torchrun (effective batch: batch_size x world_size)
    lr: float | None = None
    lr_min: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    nesterov: bool | None = None
    grad_clip: float = 5.0
    arch_lr: float | None = None
    arch_weight_decay: float = 1e-3
    arch_betas: tuple[float, float] = (0.5, 0.999)
    unrolled_r: float = 1e-2
    layers: int | None = None
    channels: int | None = None
    reductions: tuple[int, ...] | None = None
    train_portion: float = 0.5
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"            # fp32 | bf16 (autocast)
    kernels: str = "auto"              # auto | torch | triton
    resume: bool = False
    limit: int | None = None
    pc_k: int = 4
    warmup: int | None = None
    tau_max: float = 10.0
    tau_min: float = 0.1
    candidates: int = 100
    max_memory: int | str | None = None  # CUDA: largest batch size <= batch_size whose step fits (bytes or '2GiB')
    progress: bool = True


_NOT_COMPARED = ("resume", "progress", "device", "kernels", "out", "max_memory")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_size(text) -> int:
    """Bytes of a size: an int, or a number with an optional unit (case-insensitive): B; KiB/MiB/GiB/TiB and
    K/M/G/T binary (powers of 1024); KB/MB/GB/TB decimal. ``parse_size("2GiB") == 2 << 30``. KtnasError unless
    the result is a positive number of bytes."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise KtnasError(f"bad size {text!r}: pass bytes or a number with a unit, e.g. 2GiB, 1500MiB, 8GB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise KtnasError(f"bad size {text!r}: it must be at least 1 byte")
    return value


def _fmt_bytes(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def resolve_config(cfg: SearchConfig) -> SearchConfig:
    """A copy of ``cfg`` with the paper defaults filled in and the values checked (one-line KtnasError)."""
    cfg = dataclasses.replace(cfg)
    get_space(cfg.space)
    if cfg.algo not in ALGOS:
        raise KtnasError(f"unknown --algo {cfg.algo!r}: use one of {', '.join(ALGOS)}")
    if cfg.order not in (1, 2) or (cfg.order == 2 and cfg.algo not in ("darts", "pcdarts")):
        raise KtnasError(f"--order {cfg.order} with --algo {cfg.algo}: order 2 exists for darts and pcdarts only")
    if cfg.stem not in ("features", "none"):
        raise KtnasError(f"unknown --stem {cfg.stem!r}: use 'features' (a store's cached features) or 'none'")
    if cfg.stem == "features" and not cfg.features:
        raise KtnasError("no feature store given: pass --features STORE (or --stem none --dataset D)")
    if cfg.stem == "none" and not cfg.dataset:
        raise KtnasError("--stem none searches on raw images: pass --dataset D")
    if cfg.precision not in ("fp32", "bf16"):
        raise KtnasError(f"unknown --precision {cfg.precision!r}: use fp32 or bf16")
    for k, v in PAPER_DEFAULTS[cfg.algo].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.warmup is None:
        cfg.warmup = (min(PC_WARMUP, PC_WARMUP * cfg.epochs // PC_EPOCHS) if cfg.algo == "pcdarts" else 0)
    for name in ("epochs", "batch_size", "candidates", "pc_k"):
        if getattr(cfg, name) < 1:
            raise KtnasError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.limit is not None and cfg.limit < 2:
        raise KtnasError("--limit must be at least 2 (one search-train and one search-validation sample)")
    if not 0 < cfg.train_portion < 1:
        raise KtnasError(f"--train-portion must lie strictly between 0 and 1, got {cfg.train_portion}")
    if cfg.reductions is not None:
        cfg.reductions = tuple(int(r) for r in cfg.reductions)
    if cfg.max_memory is not None:
        cfg.max_memory = parse_size(cfg.max_memory)
    cfg.arch_betas = tuple(cfg.arch_betas)
    return cfg


def _config_json(cfg: SearchConfig) -> dict:
    d = asdict(cfg)
    d["arch_betas"] = list(cfg.arch_betas)
    d["reductions"] = None if cfg.reductions is None else list(cfg.reductions)
    return d


# ------------------------------------------------------------------------------------------------------ data
class ImageBatches:
    """In-memory batches of (normalised float images, labels) at ``indices``; order seeded by (seed, epoch).
    Rank ``rank`` of ``world_size`` takes the slice [rank*L, (rank+1)*L) of the epoch's permutation, L =
    ceil(n / world_size), wrapping around at the end (as ``FeatureLoader``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices, batch_size: int, seed: int, device,
                 rank: int = 0, world_size: int = 1):
        self.images, self.labels, self.indices = images, labels, np.asarray(indices)
        self.batch_size, self.seed, self.device, self.epoch = batch_size, seed, device, 0
        self.rank, self.per_rank = rank, math.ceil(len(self.indices) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(self.indices)
        L = self.per_rank
        order = torch.from_numpy(order[np.arange(self.rank * L, (self.rank + 1) * L) % len(order)])
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            yield self.images[idx].to(self.device), self.labels[idx].to(self.device)

    def close(self) -> None:
        pass


def standardise_images(x: torch.Tensor) -> torch.Tensor:
    """Float images [n, c, h, w] in [0, 1] -> the classic search's input: 3 channels (1-channel images repeated),
    normalised by the per-channel mean and std of these images."""
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def _split_indices(n: int, cfg: SearchConfig) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(cfg.seed).permutation(n)
    cut = min(max(1, int(round(n * cfg.train_portion))), n - 1)
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def _data(cfg: SearchConfig, device, rank: int = 0, world_size: int = 1):
    """(info, make) for the configured stem: ``make(batch_size)`` gives (train batches, validation batches) of
    this rank's partition; info: channels, resolution, shape [C, H, W], classes, stem, split sizes."""
    if cfg.stem == "features":
        from ktnas.cache.store import open_store
        from ktnas.cache.stream import FeatureLoader

        store = open_store(cfg.features)
        sp = store.split("train")
        n = sp.shape[0] if cfg.limit is None else min(cfg.limit, sp.shape[0])
        tr, va = _split_indices(n, cfg)
        C, H, W = sp.shape[2:]
        ncls = store.attrs.get("num_classes") or int(sp.read_labels().max()) + 1
        info = dict(in_channels=int(C), resolution=int(min(H, W)), shape=[int(C), int(H), int(W)],
                    num_classes=int(ncls), stem=store.attrs.get("stem"), train=len(tr), val=len(va))

        def make(batch_size):
            kw = dict(batch_size=batch_size, shuffle=True, device=device, seed=cfg.seed, rank=rank,
                      world_size=world_size)
            return FeatureLoader(store, "train", indices=tr, **kw), FeatureLoader(store, "train", indices=va, **kw)
        return info, make
    from ktnas.cache.datasets import load_split

    split = load_split(cfg.dataset, "train", root=cfg.data_root, image_size=cfg.image_size, seed=cfg.seed)
    n = len(split) if cfg.limit is None else min(cfg.limit, len(split))
    images = standardise_images(split.get_batch(slice(0, n)).float().div_(255))
    labels = split.labels[:n].long()
    tr, va = _split_indices(n, cfg)
    info = dict(in_channels=3, resolution=int(min(images.shape[2:])), shape=list(images.shape[1:]),
                num_classes=int(split.num_classes), stem=None, train=len(tr), val=len(va))

    def make(batch_size):
        return (ImageBatches(images, labels, tr, batch_size, cfg.seed, device, rank, world_size),
                ImageBatches(images, labels, va, batch_size, cfg.seed + 1, device, rank, world_size))
    return info, make


def _cycle(loader):
    while True:
        yield from loader


# ------------------------------------------------------------------------------------------- distributed
def _dist():
    """``torch.distributed`` when a process group of more than one rank is initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def init_distributed(device: torch.device) -> tuple[torch.device, int, int, bool]:
    """Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment) initialise the default process group,
    nccl with ``device`` cuda:LOCAL_RANK on CUDA, gloo on the CPU, unless one is initialised already. Returns
    (device, rank, world_size, whether this call created the group: then the caller destroys it)."""
    import torch.distributed as dist

    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not (launched or (dist.is_available() and dist.is_initialized())):
        return device, 0, 1, False
    if not dist.is_available():
        raise KtnasError("launched by torchrun, but this PyTorch build has no torch.distributed: run one process")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size(), created


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average ``tensors`` over the ranks in place with one ``all_reduce`` of a flattened bucket (a sum, then
    divided by the world size); returns them. A no-op outside a process group of several ranks."""
    dist = _dist()
    if dist is None or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.detach().copy_(chunk.view_as(t))
    return tensors


def all_reduce_grads(params) -> None:
    """Average the ``.grad`` of ``params`` over the ranks in place (one all_reduce; DDP's semantics: each rank's
    loss is the mean over its batch, the step follows the mean over the ranks). A gradient missing on some rank
    counts as zero there; a parameter without one on every rank keeps ``grad=None``."""
    params = list(params)
    if _dist() is None or not params:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    all_reduce_mean(grads + [present])
    for p, g, used in zip(params, grads, present.tolist()):
        if p.grad is None and used > 0:
            p.grad = g


def _sum_over_ranks(values, device) -> list[float]:
    """``values`` summed over the ranks (float64; themselves outside a process group)."""
    dist = _dist()
    if dist is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _from_rank0(fn):
    """``fn()`` evaluated on rank 0 and broadcast to every rank; a KtnasError raised there is raised on every
    rank (so no rank waits for a failed one). Plain ``fn()`` outside a process group."""
    dist = _dist()
    if dist is None:
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except KtnasError as e:
            box[0] = (False, str(e))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise KtnasError(value)
    return value


def _broadcast_model(model: nn.Module) -> None:
    """Rank 0's parameters and buffers onto every rank (as DDP's construction)."""
    dist = _dist()
    if dist is not None:
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)


def _hash(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_ranks_agree(model: Supernet, genotype, epoch: int) -> list[str]:
    """Hash of the architecture parameters per rank (gathered); KtnasError unless every rank holds the same
    architecture parameters, weights and genotype."""
    mine = (_hash(model.arch_parameters()), _hash(model.weight_parameters()),
            None if genotype is None else genotype_str(genotype))
    dist = _dist()
    every = [mine]
    if dist is not None:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    bad = [r for r, e in enumerate(every) if e != every[0]]
    if bad:
        raise KtnasError(f"the ranks disagree after epoch {epoch + 1}: rank {bad[0]} holds alphas {every[bad[0]][0]}, "
                         f"weights {every[bad[0]][1]}, rank 0 alphas {every[0][0]}, weights {every[0][1]}"
                         f"{'' if every[bad[0]][2] == every[0][2] else ' and another genotype'}: their gradients "
                         f"were not synchronised")
    return [e[0] for e in every]


# ------------------------------------------------------------------------------------------- architectures
def _none_index(space) -> int:
    return space.ops.index("none")


def genotype_arch(model: Supernet, genotype, scale: float = 1.0) -> dict:
    """{cell type: (one-hot weights [E, K] times ``scale``, op index per edge)} of a genotype; the DARTS edges it
    does not use get 'none'."""
    space, dev = model.space, next(iter(model.alphas().values())).device
    cells = ({"normal": genotype.normal, "reduce": genotype.reduce} if isinstance(genotype, DartsGenotype)
             else {"cell": genotype.edges})
    arch = {}
    for t, gene in cells.items():
        idx = [_none_index(space)] * space.edges
        if isinstance(genotype, DartsGenotype):
            for k, (op, j) in enumerate(gene):
                i = k // 2
                idx[i * (i + 3) // 2 + j] = space.ops.index(op)
        else:
            pos = {pair: e for e, pair in enumerate(space.edge_list())}
            for j, node in enumerate(gene, 1):
                for op, i in node:
                    idx[pos[(j, i)]] = space.ops.index(op)
        w = F.one_hot(torch.tensor(idx), len(space.ops)).float().to(dev) * scale
        arch[t] = (w, idx)
    return arch


def gumbel_arch(model: Supernet, tau: float, gen: torch.Generator) -> dict:
    """GDAS' hard Gumbel-softmax sample per edge: (straight-through weights, sampled index) per cell type."""
    arch = {}
    for t, a in model.alphas().items():
        while True:
            g = -torch.empty(a.shape, dtype=torch.float32).exponential_(generator=gen).log().to(a.device, a.dtype)
            probs = F.softmax((F.log_softmax(a, dim=-1) + g) / tau, dim=-1)
            idx = probs.argmax(-1)
            hard = torch.zeros_like(probs).scatter_(-1, idx[:, None], 1.0)
            w = hard - probs.detach() + probs
            if torch.isfinite(w).all():
                break
        arch[t] = (w, idx.tolist())
    return arch


def argmax_arch(model: Supernet) -> dict:
    """The most likely op per edge, one-hot (GDAS' evaluation)."""
    arch = {}
    for t, a in model.alphas().items():
        idx = a.detach().argmax(-1)
        arch[t] = (F.one_hot(idx, a.shape[1]).to(a.dtype), idx.tolist())
    return arch


def derive(model: Supernet):
    """The genotype of the current architecture weights (PC-DARTS: edges ranked by softmax(alpha) * edge weight)."""
    a = {t: p.detach().double().cpu() for t, p in model.alphas().items()}
    if model.space.name == "nb201":
        return derive_nb201(a["cell"], model.space.ops)
    if not model.edge_norm:
        return derive_darts(a["normal"], a["reduce"], model.space.steps, model.space.ops)
    gene = {}
    for t in ("normal", "reduce"):
        w = (F.softmax(a[t], -1) * model.edge_weights(t).detach().double().cpu()[:, None]).numpy()
        gene[t] = _parse_darts(w, model.space.steps, model.space.ops)
    concat = list(range(2, model.space.steps + 2))
    return DartsGenotype(gene["normal"], concat, gene["reduce"], concat)


def genotype_str(g) -> str:
    """One line: NB201's architecture string, or DARTS' cells as ``normal=op~input,... reduce=...``."""
    if isinstance(g, DartsGenotype):
        return " ".join(f"{t}=" + ",".join(f"{op}~{j}" for op, j in getattr(g, t)) for t in ("normal", "reduce"))
    return g.to_string()


# --------------------------------------------------------------------------------------------- the architect
def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def unrolled_arch_grad(model: Supernet, loss_fn, xt, yt, xv, yv, eta: float, w_opt=None, momentum: float = 0.9,
                       weight_decay: float = 3e-4, r: float = 1e-2, reduce=None) -> list[torch.Tensor]:
    """DARTS' second-order architecture gradient (``Architect._backward_step_unrolled``), returned per
    ``model.arch_parameters()``; ``loss_fn(x, y)`` is the model's loss on a batch. The weights are left as they
    were (restored from a copy, not by adding the perturbations back). ``reduce`` (e.g. :func:`all_reduce_mean`)
    is applied to each gradient list as soon as it is computed, so under DDP the unrolled weights, R and the
    finite differences use the gradients averaged over the ranks."""
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


# -------------------------------------------------------------------------------------------------- epochs
def _tau(cfg: SearchConfig, epoch: int) -> float:
    return cfg.tau_max - (cfg.tau_max - cfg.tau_min) * epoch / max(1, cfg.epochs - 1)


class _Run:
    """One search: model, optimisers, data and the per-epoch loop (see :func:`search`). ``ddp``: average the
    gradients and the metrics over the ranks of the process group."""

    def __init__(self, cfg: SearchConfig, device, info: dict, ddp: bool = False):
        self.cfg, self.device, self.info, self.ddp = cfg, device, info, ddp
        space = cfg.space
        if cfg.stem == "none":
            layers, channels, reductions = classic_layout(space)
        else:
            layers, channels, reductions = kt_layout(space, info["resolution"])
        if cfg.layers is not None and cfg.layers != layers and cfg.reductions is None:
            reductions = default_reductions(space, cfg.layers)
        self.layout = dict(layers=cfg.layers or layers, channels=cfg.channels or channels,
                           reductions=list(reductions if cfg.reductions is None else cfg.reductions))
        pc = cfg.algo == "pcdarts"
        self.model = Supernet(space, info["num_classes"], info["in_channels"],
                              stem="cached" if cfg.stem == "features" else "conv", k=cfg.pc_k if pc else 1,
                              edge_norm=pc, kernels=cfg.kernels, **self.layout).to(device)
        self.w_opt = torch.optim.SGD(self.model.weight_parameters(), cfg.lr, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay, nesterov=bool(cfg.nesterov))
        self.a_opt = torch.optim.Adam(self.model.arch_parameters(), cfg.arch_lr, betas=cfg.arch_betas,
                                      weight_decay=cfg.arch_weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, cfg.epochs, eta_min=cfg.lr_min)
        self.criterion = nn.CrossEntropyLoss()
        self.amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        self.foreach = None  # gradient clipping's multi-tensor kernels: torch's default (CUDA yes, CPU no)

    def loss(self, x, y, arch=None):
        with torch.autocast(**self.amp):
            logits = self.model(x, arch)
        return self.criterion(logits.float(), y), logits

    def _weight_step(self, x, y, arch=None):
        self.w_opt.zero_grad(set_to_none=True)
        loss, logits = self.loss(x, y, arch)
        loss.backward()
        if self.ddp:
            all_reduce_grads(self.model.weight_parameters())
        nn.utils.clip_grad_norm_(self.model.weight_parameters(), self.cfg.grad_clip, foreach=self.foreach)
        self.w_opt.step()
        return loss.detach(), logits.detach()

    def _arch_step(self, xt, yt, xv, yv, arch=None):
        self.a_opt.zero_grad(set_to_none=True)
        if self.cfg.order == 2:
            eta = self.w_opt.param_groups[0]["lr"]
            grads = unrolled_arch_grad(self.model, lambda x, y: self.loss(x, y)[0], xt, yt, xv, yv, eta, self.w_opt,
                                       self.cfg.momentum, self.cfg.weight_decay, self.cfg.unrolled_r,
                                       reduce=all_reduce_mean if self.ddp else None)
            for p, g in zip(self.model.arch_parameters(), grads):
                p.grad = g
        else:
            self.loss(xv, yv, arch)[0].backward()
            for p in self.model.weight_parameters():  # the weight step must not see the validation gradient
                p.grad = None
            if self.ddp:
                all_reduce_grads(self.model.arch_parameters())
        self.a_opt.step()

    def search_step(self, epoch: int, xt, yt, xv, yv, gen: torch.Generator, rng: np.random.Generator):
        """One step of the algorithm on a training and a validation batch (the body of the train loop; also what
        ``ktnas bench search`` times): darts/pcdarts an architecture step (from ``warmup`` on), then a weight step;
        gdas a weight and an architecture step, each under its own Gumbel sample from ``gen``; random a weight step
        under a genotype drawn from ``rng``. Returns the weight step's (loss, logits), detached."""
        cfg, model = self.cfg, self.model
        if cfg.algo == "gdas":
            loss, logits = self._weight_step(xt, yt, gumbel_arch(model, _tau(cfg, epoch), gen))
            self._arch_step(xt, yt, xv, yv, gumbel_arch(model, _tau(cfg, epoch), gen))
        elif cfg.algo == "random":
            loss, logits = self._weight_step(xt, yt, genotype_arch(model, random_genotype(model.space, rng)))
        else:
            if epoch >= cfg.warmup:
                self._arch_step(xt, yt, xv, yv)
            loss, logits = self._weight_step(xt, yt)
        return loss, logits

    def train_epoch(self, epoch: int, train, val) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        rng = np.random.default_rng([cfg.seed, epoch, 1])
        tot_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(zip(train, _cycle(val)), total=len(train), desc=f"search {cfg.algo} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False, file=sys.stderr, dynamic_ncols=True)
        for (xt, yt), (xv, yv) in bar:
            loss, logits = self.search_step(epoch, xt, yt, xv, yv, gen, rng)
            tot_loss += float(loss) * len(yt)
            correct += int((logits.argmax(-1) == yt).sum())
            seen += len(yt)
            bar.set_postfix(loss=f"{tot_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        if self.ddp:
            tot_loss, correct, seen = _sum_over_ranks((tot_loss, correct, seen), self.device)
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
            tot_loss, correct, seen = _sum_over_ranks((tot_loss, correct, seen), self.device)
        return dict(val_loss=tot_loss / seen, val_acc=correct / seen)

    def eval_arch_fn(self, epoch: int):
        cfg, model = self.cfg, self.model
        if cfg.algo == "gdas":
            return lambda: argmax_arch(model)
        if cfg.algo == "random":
            rng = np.random.default_rng([cfg.seed, epoch, 2])
            return lambda: genotype_arch(model, random_genotype(model.space, rng))
        return lambda: None

    def select_candidate(self, val) -> tuple[object, list[dict]]:
        """Random search's final step: evaluate ``candidates`` random genotypes on validation, keep the best."""
        rng = np.random.default_rng([self.cfg.seed, 2 ** 20])
        rows = []
        for _ in tqdm(range(self.cfg.candidates), desc="evaluate candidates", disable=not self.cfg.progress,
                      leave=False, file=sys.stderr, dynamic_ncols=True):
            g = random_genotype(self.model.space, rng)
            arch = genotype_arch(self.model, g)
            rows.append(dict(genotype=g.to_json(), genotype_str=genotype_str(g), **self.evaluate(val, lambda: arch)))
        best = max(range(len(rows)), key=lambda i: (rows[i]["val_acc"], -rows[i]["val_loss"]))
        g = genotype_from_json(rows[best]["genotype"])
        with torch.no_grad():  # the chosen genotype as the final alphas (derive gives it back)
            for t, (w, _) in genotype_arch(self.model, g, scale=5.0).items():
                if self.model.space.name == "darts":
                    w[:, _none_index(self.model.space)] = 0
                self.model.alphas()[t].copy_(w)
        return g, rows


# ------------------------------------------------------------------------------------------------ run files
def _save_checkpoint(path: Path, run: _Run, epoch: int, history, alpha_hist) -> None:
    state = dict(model=run.model.state_dict(), w_opt=run.w_opt.state_dict(), a_opt=run.a_opt.state_dict(),
                 sched=run.sched.state_dict(), epoch=epoch, history=history,
                 alpha_hist={k: torch.from_numpy(v) for k, v in alpha_hist.items()},
                 config=_config_json(run.cfg),
                 rng=rng_state())
    atomic_save(state, path)


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise KtnasError(f"{path}: unreadable checkpoint ({type(e).__name__}): remove the run directory and start "
                         f"again") from None


def _load_checkpoint(state: dict, run: _Run):
    """Restore ``run`` from a checkpoint's ``state`` (read by rank 0); returns (epoch, history, alpha_hist)."""
    old, new = state["config"], _config_json(run.cfg)
    diff = [k for k in new if k not in _NOT_COMPARED and old.get(k) != new[k]]
    if diff:
        raise KtnasError(f"--resume with a different configuration than the run's ({diff[0]}: {old.get(diff[0])!r}"
                         f" -> {new[diff[0]]!r}): resume with the same flags, or use another --out")
    run.model.load_state_dict(state["model"])
    run.w_opt.load_state_dict(state["w_opt"])
    run.a_opt.load_state_dict(state["a_opt"])
    run.sched.load_state_dict(state["sched"])
    set_rng_state(state["rng"])
    alpha_hist = {k: v.cpu().numpy() for k, v in state["alpha_hist"].items()}
    return state["epoch"], state["history"], alpha_hist


def _write_epoch_files(out: Path, history, alpha_hist, genotype) -> None:
    atomic_write_jsonl(out / "metrics.jsonl", history)
    def save_alphas(p):
        with open(p, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, **alpha_hist)

    atomic_write(out / "alphas.npz", save_alphas)
    if genotype is not None:
        atomic_write(out / "genotype.json", lambda p: genotype.save(p))


# -------------------------------------------------------------------------------------------------- pictures
def plot_alphas(alpha_hist: dict, ops, path) -> None:
    """softmax(alpha) per op, averaged over edges, against the epoch; one panel per cell type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({k.rsplit("_e", 1)[0] for k in alpha_hist}, key=["normal", "reduce", "cell"].index)
    fig, axes = plt.subplots(1, len(types), figsize=(5.5 * len(types), 4), squeeze=False)
    for ax, t in zip(axes[0], types):
        keys = sorted(k for k in alpha_hist if k.rsplit("_e", 1)[0] == t)
        epochs = [int(k.rsplit("_e", 1)[1]) + 1 for k in keys]
        w = np.stack([np.exp(a - a.max(-1, keepdims=True)) / np.exp(a - a.max(-1, keepdims=True)).sum(-1,
                      keepdims=True) for a in (alpha_hist[k] for k in keys)]).mean(1)
        for j, op in enumerate(ops):
            ax.plot(epochs, w[:, j], marker="o", ms=3, label=op)
        ax.set(title=f"{t} cell", xlabel="epoch", ylabel="mean softmax(alpha)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cell(genotype, cell: str, path) -> None:
    """The found cell as a DAG: nodes as circles, edges as arrows labelled with their op."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, FancyArrowPatch

    if isinstance(genotype, DartsGenotype):
        gene, steps = getattr(genotype, cell), genotype.steps
        names = ["c_{k-2}", "c_{k-1}"] + [str(i) for i in range(steps)] + ["c_{k}"]
        pos = {0: (0, 1.2), 1: (0, -1.2), **{2 + i: (1.6 + 1.4 * i, 1.1 * (-1) ** i) for i in range(steps)},
               steps + 2: (1.6 + 1.4 * steps, 0)}
        edges = [(j, 2 + k // 2, op) for k, (op, j) in enumerate(gene)]
        edges += [(c, steps + 2, None) for c in getattr(genotype, f"{cell}_concat")]
    else:
        n = len(genotype.edges) + 1
        names = [str(i) for i in range(n)]
        pos = {i: (2.0 * i, 0) for i in range(n)}
        edges = [(i, j, op) for j, node in enumerate(genotype.edges, 1) for op, i in node if op != "none"]
    radius, top = 0.32, 0.0
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(pos), 4.4))
    for a, b, op in edges:
        p0, p2 = np.array(pos[a], float), np.array(pos[b], float)
        rad = 0.0 if isinstance(genotype, DartsGenotype) else 0.3 * (b - a - 1) * (-1) ** a
        d = p2 - p0
        ctrl = (p0 + p2) / 2 + rad * np.array([d[1], -d[0]])  # matplotlib's arc3 control point
        s0 = p0 + radius * (ctrl - p0) / np.linalg.norm(ctrl - p0)  # start and end on the circles
        s2 = p2 + radius * (ctrl - p2) / np.linalg.norm(ctrl - p2)
        ax.add_patch(FancyArrowPatch(tuple(s0), tuple(s2), arrowstyle="-|>", mutation_scale=12, shrinkA=0, shrinkB=0,
                                     connectionstyle=f"arc3,rad={rad}", color="0.55" if op is None else "0.1",
                                     linestyle="--" if op is None else "-", lw=1.1))
        mid = (p0 + p2) / 4 + ctrl / 2  # the curve at t = 1/2
        top = max(top, abs(mid[1]))
        if op is not None:
            angle = math.degrees(math.atan2(d[1], d[0])) if rad == 0 else 0.0
            angle = angle - 180 if angle > 90 else angle + 180 if angle < -90 else angle
            ax.text(*mid, op, fontsize=7, ha="center", va="center", rotation=angle, rotation_mode="anchor",
                    bbox=dict(boxstyle="round,pad=0.12", fc="white", ec="none", alpha=0.85), zorder=2)
    for i, (x, y) in pos.items():
        io = isinstance(genotype, DartsGenotype) and i in (0, 1, len(pos) - 1)
        ax.add_patch(Circle((x, y), radius, fc="#f9cb9c" if io else "#cfe2f3", ec="0.2", zorder=3))
        ax.text(x, y, f"${names[i]}$" if "_" in names[i] else names[i], ha="center", va="center", fontsize=9,
                zorder=4)
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(min(min(ys), -top) - 0.6, max(max(ys), top) + 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"{cell} cell" if cell != "cell" else "NAS-Bench-201 cell ('none' edges not drawn)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- memory budget
def _trial_peak(cfg: SearchConfig, device, info: dict, batch_size: int) -> int | None:
    """``torch.cuda.max_memory_allocated`` over one search step (a fresh network, the algorithm's architecture
    and weight steps on random inputs of the data's shape) at ``batch_size``; None when it runs out of memory."""
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run = _Run(dataclasses.replace(cfg, batch_size=batch_size, progress=False), device, info)
        batch = lambda: (torch.randn(batch_size, *info["shape"], device=device),
                         torch.randint(info["num_classes"], (batch_size,), device=device))
        run.train_epoch(cfg.warmup, [batch()], [batch()])  # at epoch `warmup` the alphas train (pcdarts too)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    except torch.cuda.OutOfMemoryError:
        return None


def choose_batch_size(cfg: SearchConfig, device, info: dict) -> int:
    """The largest batch size in [1, cfg.batch_size] whose trial step (:func:`_trial_peak`) peaks within
    ``cfg.max_memory`` bytes, by binary search (out of memory counts as too big); under torchrun the smallest
    choice of the ranks. KtnasError if not even batch size 1 fits."""
    peaks = {}

    def fits(b: int) -> bool:
        peaks[b] = _trial_peak(cfg, device, info, b)
        gc.collect()
        torch.cuda.empty_cache()
        return peaks[b] is not None and peaks[b] <= cfg.max_memory

    lo, hi = 0, cfg.batch_size  # invariant: lo fits (0 trivially), hi does not (unless it is the request)
    if fits(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    lo = _min_over_ranks(lo, device)
    if lo == 0:
        need = "runs out of memory" if peaks.get(1) is None else f"needs {_fmt_bytes(peaks[1])}"
        raise KtnasError(f"--max-memory {_fmt_bytes(cfg.max_memory)}: even batch size 1 {need}: allow more memory, "
                         f"or search a smaller network (--channels, --layers)")
    return lo


def _min_over_ranks(value: int, device) -> int:
    """The smallest ``value`` of the ranks (itself outside a process group)."""
    dist = _dist()
    if dist is None:
        return int(value)
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------------- search
def search(cfg: SearchConfig | None = None, **overrides) -> dict:
    """Run the configured search (see the module docstring); returns a summary: out, genotype (JSON form),
    genotype_str, epochs, the last epoch's metrics, layout and parameter counts. Under torchrun every rank
    calls it (see "Data parallel" in the module docstring) and gets the same summary; only rank 0 writes."""
    from ktnas.cache.precompute import resolve_device

    cfg = dataclasses.replace(cfg or SearchConfig(), **overrides)
    cfg = resolve_config(cfg)
    device, rank, world_size, created = init_distributed(resolve_device(cfg.device))
    try:
        return _search(cfg, device, rank, world_size)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _search(cfg: SearchConfig, device, rank: int, world_size: int) -> dict:
    if cfg.max_memory is not None and device.type != "cuda":
        raise KtnasError(f"--max-memory needs a CUDA device: this search runs on {device}; drop --max-memory or "
                         f"use --device cuda")
    if rank:
        cfg = dataclasses.replace(cfg, progress=False)
    main = rank == 0
    out = Path(cfg.out)
    ckpt = out / "checkpoint.pt"

    def read_state():
        if not ckpt.exists():
            return None
        if not cfg.resume:
            raise KtnasError(f"{out} already holds a search (checkpoint.pt): pass --resume to continue it, or "
                             f"another --out")
        return _read_checkpoint(ckpt)

    state = _from_rank0(read_state)
    _seed_all(cfg.seed)
    info, make_loaders = _data(cfg, device, rank, world_size)
    chosen = None
    if cfg.max_memory is not None:
        if state is not None:
            chosen, how = int(state["config"]["batch_size"]), "the resumed run's"
        else:
            chosen, how = choose_batch_size(cfg, device, info), "largest fitting"
            _seed_all(cfg.seed)  # the trials drew from the global generators
        if main:
            print(f"ktnas search: --max-memory {_fmt_bytes(cfg.max_memory)}: batch size {chosen} per rank ({how}; "
                  f"asked for {cfg.batch_size})", file=sys.stderr)
        cfg = dataclasses.replace(cfg, batch_size=chosen)
    train, val = make_loaders(cfg.batch_size)
    try:
        run = _Run(cfg, device, info, ddp=world_size > 1)
        start, history, alpha_hist = 0, [], {}
        if state is not None:
            start, history, alpha_hist = _load_checkpoint(state, run)
        _broadcast_model(run.model)
        resolved = dict(_config_json(cfg), layout=run.layout, data=info, world_size=world_size,
                        effective_batch_size=cfg.batch_size * world_size, params=count_parameters(run.model),
                        arch_params=sum(p.numel() for p in run.model.arch_parameters()),
                        kernels_used=resolve_impl(cfg.kernels, device))
        if chosen is not None:
            resolved["batch_size_chosen"] = chosen
        if main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")
        model, genotype = run.model, None
        for epoch in range(start, cfg.epochs):
            train.set_epoch(epoch)
            val.set_epoch(epoch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            rec = dict(epoch=epoch + 1, lr=run.w_opt.param_groups[0]["lr"])
            if cfg.algo == "gdas":
                rec["tau"] = _tau(cfg, epoch)
            rec.update(run.train_epoch(epoch, train, val))
            run.model.eval()
            rec.update(run.evaluate(val, run.eval_arch_fn(epoch)))
            run.sched.step()
            if cfg.algo == "random":
                if epoch == cfg.epochs - 1:
                    genotype, rows = run.select_candidate(val)
                    if main:
                        atomic_write(out / "candidates.json", lambda p: p.write_text(json.dumps(rows, indent=1)))
                    rec["candidates"] = len(rows)
            else:
                genotype = derive(model)
            rec["seconds"] = time.perf_counter() - t0
            rec["peak_memory_bytes"] = -_min_over_ranks(-peak_memory(device), device)  # the largest rank's
            rec["entropy"] = {t: alpha_entropy(a) for t, a in model.alphas().items()}
            rec["skips"] = None if genotype is None else count_skips(genotype)
            rec["genotype"] = None if genotype is None else genotype_str(genotype)
            rec["world_size"] = world_size
            rec["rank_alpha_hashes"] = _check_ranks_agree(model, genotype, epoch)
            history.append(rec)
            for t, a in model.alphas().items():
                alpha_hist[f"{t}_e{epoch:03d}"] = a.detach().float().cpu().numpy().copy()
            if main:
                _write_epoch_files(out, history, alpha_hist, genotype)
                _save_checkpoint(ckpt, run, epoch + 1, history, alpha_hist)
            if cfg.progress:
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train {rec['train_loss']:.3f}/{rec['train_acc']:.3f} "
                           f"val {rec['val_loss']:.3f}/{rec['val_acc']:.3f} skips {rec['skips']} "
                           f"entropy {' '.join(f'{v:.3f}' for v in rec['entropy'].values())}\n  "
                           f"{rec['genotype']}", file=sys.stderr)
        if genotype is None:  # resumed after the last epoch: the files are there already
            genotype = _from_rank0(lambda: load_genotype(out / "genotype.json"))
        if main:
            plot_alphas(alpha_hist, model.space.ops, out / "alphas.png")
            for cell in (("normal", "reduce") if isinstance(genotype, DartsGenotype) else ("cell",)):
                plot_cell(genotype, cell, out / f"{cell}.png")
        return dict(out=str(out), genotype=genotype.to_json(), genotype_str=genotype_str(genotype),
                    rank=rank, world_size=world_size, epochs=cfg.epochs, last=history[-1] if history else None,
                    layout=run.layout, params=resolved["params"], arch_params=resolved["arch_params"])
    finally:
        train.close()
        val.close()
        if getattr(train, "store", None) is not None:  # both loaders share the store _data opened
            train.store.close()


# ------------------------------------------------------------------------------------------------------- CLI
def _reductions(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise KtnasError(f"--reductions must be comma-separated cell positions (e.g. 2,5; '' for none), got "
                         f"{text!r}") from None


def cmd_search(args) -> int:
    """``ktnas search``: map the flags onto a SearchConfig and run :func:`search`."""
    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.reductions is not None:
        kw["reductions"] = _reductions(args.reductions)
    kw["progress"] = not args.quiet
    s = search(SearchConfig(**kw))
    last = s["last"] or {}
    if s["rank"] == 0:
            print(f"{s['out']}: {s['epochs']} epochs, val acc {last.get('val_acc', float('nan')):.4f}, "
              f"{s['params'] / 1e6:.3f} M params; genotype {s['genotype_str']}")
    return 0


def add_search_parser(subparsers) -> None:
    """Add the ``search`` subcommand (``func=cmd_search``) to an argparse subparsers object."""
    d = SearchConfig()
    s = subparsers.add_parser("search", help="architecture search on a feature store (or raw images: --stem none)",
                              description="Search a DARTS / NAS-Bench-201 cell on cached stem features. Unset "
                                          "hyper-parameters take the algorithm's paper defaults.")
    s.add_argument("--features", help="feature store (from precompute-features)")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--space", default=d.space, choices=("darts", "nb201"))
    s.add_argument("--algo", default=d.algo, choices=ALGOS)
    s.add_argument("--order", type=int, default=d.order, choices=(1, 2), help="darts/pcdarts: 2 = unrolled")
    s.add_argument("--stem", default=d.stem, choices=("features", "none"),
                   help="features: the store's frozen stem (KT-NAS); none: classic conv stem on --dataset images")
    s.add_argument("--dataset", help="with --stem none: fashion-mnist, cifar10, synthetic:TRAIN/TEST, ...")
    s.add_argument("--data-root", help="folder with the data set's files")
    s.add_argument("--epochs", type=int, help="default: 50 (gdas: 250)")
    s.add_argument("--batch-size", type=int, help="per rank under torchrun; default: 64 (pcdarts: 256)")
    s.add_argument("--max-memory", metavar="SIZE",
                   help="CUDA: the largest batch size up to --batch-size whose search step peaks within SIZE "
                        "(e.g. 2GiB, 1500MiB, 8GB, bytes)")
    s.add_argument("--layers", type=int, help="cells (NB201: cells + reduction blocks); default: see docs")
    s.add_argument("--channels", type=int, help="channels of the first cells")
    s.add_argument("--reductions", help="comma-separated reduction positions ('' for none)")
    s.add_argument("--lr", type=float, help="weight learning rate (cosine to --lr-min)")
    s.add_argument("--lr-min", type=float)
    s.add_argument("--momentum", type=float, default=d.momentum)
    s.add_argument("--weight-decay", type=float)
    s.add_argument("--grad-clip", type=float, default=d.grad_clip)
    s.add_argument("--arch-lr", type=float)
    s.add_argument("--arch-weight-decay", type=float, default=d.arch_weight_decay)
    s.add_argument("--warmup", type=int, help="pcdarts: epochs before the alphas train (default floor(0.3 E))")
    s.add_argument("--pc-k", type=int, default=d.pc_k, help="pcdarts: 1/K of the channels enter the mixed op")
    s.add_argument("--tau-max", type=float, default=d.tau_max)
    s.add_argument("--tau-min", type=float, default=d.tau_min)
    s.add_argument("--candidates", type=int, default=d.candidates, help="random: genotypes evaluated at the end")
    s.add_argument("--train-portion", type=float, default=d.train_portion)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    s.add_argument("--precision", default=d.precision, choices=("fp32", "bf16"))
    s.add_argument("--kernels", default=d.kernels, choices=("auto", "triton", "torch"))
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.add_argument("--limit", type=int, help="first N samples of the train split only")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_search)
