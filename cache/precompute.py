"""``ktnas precompute-features``: run a frozen stem once over a data set and write its features to a store.

The loop is chunk by chunk: images of the next chunk are loaded in the background, the stem runs on the
current one (sub-batches aligned to the chunk's start, so any rerun computes exactly the same batches), and a
writer thread writes finished chunks while the stem computes the next. Each written chunk is flagged in the
store, so a run that was interrupted (Ctrl-C, kill -9, full disk) and is rerun with ``--resume`` skips what is
there and ends with the store an uninterrupted run writes. ``--shard I/N`` makes N processes (or torchrun
ranks) write disjoint chunks of one store; whichever finishes last marks it complete.
"""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import datasets
from .datasets import augment
from .errors import KtnasError
from .files import disk_full_as_error
from .flags import option
from .resume import open_or_create, pending_chunks, request, request_hash
from .runtime import DEFAULT_OUT, progress, resolve_device
from .stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM, get_stem
from .store import COMPRESSORS, open_store, resolve_compressor, store_exists

DTYPES = ("float16", "float32")
CHUNK_BYTES = 8 << 20  # target uncompressed bytes per chunk when --chunk-size is not given


def parse_shard(text) -> tuple[int, int]:
    """``'1/4'`` -> (1, 4) (a pair is taken as it is)."""
    if isinstance(text, tuple):
        text = "/".join(map(str, text))
    try:
        i, n = (int(t) for t in str(text).split("/"))
    except ValueError:
        raise KtnasError(f"bad --shard '{text}': write it as I/N, e.g. 0/2 and 1/2 for two processes") from None
    if not (n >= 1 and 0 <= i < n):
        raise KtnasError(f"bad --shard '{text}': I must be in 0..N-1 (e.g. 0/2 and 1/2)")
    return i, n


def torchrun_shard() -> tuple[int, int]:
    """Under torchrun each rank takes its own shard (RANK/WORLD_SIZE); else the whole store (0/1)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


@dataclass
class PrecomputeConfig:
    """Everything ``ktnas precompute-features`` takes (its flags are made from these fields); the defaults are the
    embedded default job."""

    dataset: str = option("fashion-mnist", f"one of {', '.join(datasets.DATASETS)}")
    data_root: str | None = option(None, "folder with the data set's files (default: the usual places)")
    stem: str = option(DEFAULT_STEM, "ARCH:CUT, see `ktnas stems`")
    weights: str = option("imagenet", "imagenet | none | PATH to a state dict")
    image_size: int = option(DEFAULT_IMAGE_SIZE, "stem input size")
    out: str = option(DEFAULT_OUT, "store path: .zarr (Zarr v3) or .h5 (HDF5)")
    dtype: str = option("float16", choices=DTYPES)
    views: int = option(1, "views per image: view 0 is the plain image, views 1..V-1 random crops and flips")
    splits: tuple[str, ...] = option(("train", "test"), "comma-separated splits")
    batch_size: int | None = option(None, "stem batch (default: 64 on CPU, 256 on CUDA)")
    device: str = option("auto", "auto | cpu | cuda")
    chunk_size: int | None = option(None, "samples per chunk (default: ~8 MiB chunks)")
    compressor: str | None = option(None, "zstd | gzip | lzf | none (default: zstd for .zarr; gzip, i.e. deflate + "
                                          "shuffle, for .h5, which every HDF5 tool reads; zstd there needs "
                                          "hdf5plugin; lzf: HDF5 only; a resumed store keeps its own)",
                                    choices=COMPRESSORS)
    limit: int | None = option(None, "first N samples of each split only")
    shard: tuple[int, int] | str | None = option(None, "I/N: this process writes every N-th chunk from I (default "
                                                       "under torchrun: RANK/WORLD_SIZE, else 0/1)", type=str,
                                                 metavar="I/N")
    resume: bool = option(False, "continue an interrupted store", exclusive="existing store")
    overwrite: bool = option(False, "replace an existing store", exclusive="existing store")
    seed: int = option(0, "seed of the augmented views")
    progress: bool = option(True, "no progress bar", flag="quiet")
    extra: dict = field(default_factory=dict)


def auto_chunk_size(sample_bytes: int, n_max: int) -> int:
    c = max(64, min(4096, CHUNK_BYTES // max(1, sample_bytes)))
    return int(max(1, min(n_max, c // 64 * 64)))


def _versions() -> dict:
    import h5py
    import torchvision
    import zarr

    return dict(torch=torch.__version__, torchvision=torchvision.__version__, zarr=zarr.__version__,
                h5py=h5py.__version__, numpy=np.__version__)


class _StopOnSigint:
    """Ctrl-C (SIGINT) only sets a flag that the chunk loop checks, so the interrupt never lands inside a lock
    or a queue operation shared with the writer thread (which could hang the shutdown); a second Ctrl-C
    interrupts at once. Only the main thread can install signal handlers; elsewhere this does nothing."""

    def __init__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class _Writer(threading.Thread):
    """Writes finished chunks while the stem computes the next ones; records the first error."""

    def __init__(self, store, depth=2):
        super().__init__(daemon=True, name="ktnas-writer")
        self.store, self.q, self.error, self.written = store, queue.Queue(maxsize=depth), None, 0
        self._splits = {}

    def run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            split, i, feats, labels, on_done = item
            try:
                if split not in self._splits:
                    self._splits[split] = self.store.split(split)
                self._splits[split].write_chunk(i, feats, labels)
                self.written += 1
                on_done(len(labels))
            except BaseException as e:  # surfaced in the main thread
                self.error = e

    def put(self, item):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self):
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def precompute(cfg: PrecomputeConfig | None = None, **overrides) -> dict:
    """Run the stem over the data set and write the store (see the module docstring). Returns a summary."""
    cfg = _checked(cfg or PrecomputeConfig(), overrides)
    device = resolve_device(cfg.device)
    cfg.batch_size = cfg.batch_size or (256 if device.type == "cuda" else 64)
    splits = {s: datasets.load_split(cfg.dataset, s, root=cfg.data_root, image_size=cfg.image_size,
                                     seed=cfg.seed) for s in cfg.splits}
    stem = get_stem(cfg.stem, cfg.weights, cfg.image_size).to(device)
    if device.type == "cuda":
        stem = stem.to(memory_format=torch.channels_last)
    store = open_or_create(cfg, *_layout(cfg, stem, splits))

    split_handles = {s: store.split(s) for s in cfg.splits}
    todo = pending_chunks(split_handles, cfg.shard)
    n_images = sum(b - a for a, b in (split_handles[s].chunk_range(i) for s, i in todo))
    summary = dict(out=cfg.out, device=str(device), chunks_total=sum(sp.num_chunks for sp in split_handles.values()),
                   chunks_written=0, chunks_skipped=0, images=int(n_images), seconds=0.0)
    summary["chunks_skipped"] = summary["chunks_total"] - len(todo) if cfg.shard[1] == 1 else 0

    written, seconds, interrupted = _write_chunks(cfg, stem, splits, split_handles, store, todo, n_images, device)
    summary["chunks_written"] = written
    summary["seconds"] = seconds
    summary["images_per_s"] = n_images / summary["seconds"] if summary["seconds"] > 0 and not interrupted else None
    if interrupted:
        store.close()
        print(f"interrupted: {written} chunks written to {cfg.out}; rerun the same command with --resume "
              "to finish", file=sys.stderr)
        raise KeyboardInterrupt
    summary["complete"] = store.mark_complete_if_done()
    store.close()
    return summary


def _checked(cfg: PrecomputeConfig, overrides: dict) -> PrecomputeConfig:
    """``cfg`` with ``overrides`` applied, refused (one line) where its values cannot work together."""
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.shard = torchrun_shard() if cfg.shard is None else parse_shard(cfg.shard)
    cfg.splits = tuple(cfg.splits)
    if cfg.dtype not in DTYPES:
        raise KtnasError(f"unknown --dtype '{cfg.dtype}': use float16 or float32")
    if cfg.views < 1 or (cfg.batch_size or 1) < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise KtnasError("--views, --batch-size and --limit must be positive integers")
    if cfg.resume and cfg.overwrite:
        raise KtnasError("--resume and --overwrite exclude each other: pick one")
    if cfg.compressor is None and cfg.resume and store_exists(cfg.out):
        cfg.compressor = _stored_compressor(cfg.out)
    cfg.compressor = resolve_compressor(cfg.out, cfg.compressor)
    return cfg


def _stored_compressor(path) -> str | None:
    """The compressor of the store at ``path`` (None when it is unreadable: open_or_create says why)."""
    try:
        with open_store(path, require_complete=False) as s:
            return s.attrs.get("request", {}).get("compressor", s.attrs.get("compressor"))
    except KtnasError:
        return None


def _layout(cfg: PrecomputeConfig, stem, splits: dict) -> tuple[dict, dict, int]:
    """The store's attributes, its splits' feature shapes and its chunk size, for this config and stem."""
    feat_shape = stem.output_shape
    counts = {s: len(d) if cfg.limit is None else min(cfg.limit, len(d)) for s, d in splits.items()}
    sample_bytes = cfg.views * int(np.prod(feat_shape)) * np.dtype(cfg.dtype).itemsize
    chunk_size = cfg.chunk_size or auto_chunk_size(sample_bytes, max(counts.values()))
    if chunk_size < 1:
        raise KtnasError("--chunk-size must be a positive integer")
    req = request(cfg, stem, splits, chunk_size)
    first = next(iter(splits.values()))
    attrs = dict(stem.describe(), request=req, request_hash=request_hash(req), dataset=cfg.dataset,
                 dataset_fingerprints=req["dataset_fingerprints"], num_classes=first.num_classes,
                 classes=list(first.classes), views=cfg.views, seed=cfg.seed, limit=cfg.limit,
                 augmentation=dict(view0="plain", others="random crop (zero pad image_size/8) + horizontal flip",
                                   seeded_by="(seed, split, sample index, view)"),
                 versions=_versions(), **cfg.extra)
    shapes = {s: (n, cfg.views, *feat_shape) for s, n in counts.items()}
    return attrs, shapes, chunk_size


def _write_chunks(cfg: PrecomputeConfig, stem, splits: dict, split_handles: dict, store, todo: list,
                  n_images: int, device) -> tuple[int, float, bool]:
    """The chunk loop over ``todo``: the next chunk's images load in the background while the stem runs on
    this one and the writer thread writes the last. Returns (chunks written, seconds, interrupted by Ctrl-C)."""
    bar = progress(total=n_images, unit="img", unit_scale=True, desc=f"precompute {stem.spec}",
                   enabled=cfg.progress)
    writer = _Writer(store)
    writer.start()
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktnas-images")

    def load(item):
        s, i = item
        a, b = split_handles[s].chunk_range(i)
        return splits[s].get_batch(slice(a, b)), splits[s].labels[a:b]

    interrupted = False
    stop = _StopOnSigint()
    try:
        nxt = pool.submit(load, todo[0]) if todo else None
        for k, (s, i) in enumerate(todo):
            if stop.requested:
                raise KeyboardInterrupt
            images, labels = nxt.result()
            nxt = pool.submit(load, todo[k + 1]) if k + 1 < len(todo) else None
            a, _ = split_handles[s].chunk_range(i)
            feats = run_stem(stem, images, a, cfg, s, device, stem.output_shape)
            _check_finite(feats, a, stem, splits[s], s, cfg)
            writer.put((s, i, feats, labels.numpy(), bar.update))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.restore()
        pool.shutdown(wait=True, cancel_futures=True)
        try:
            with disk_full_as_error(cfg.out, "a chunk"):
                writer.finish()  # whatever was computed is written, also on Ctrl-C
        finally:
            bar.close()
    return writer.written, time.perf_counter() - t0, interrupted


def _check_finite(feats: np.ndarray, start: int, stem, split_data, split: str, cfg: PrecomputeConfig) -> None:
    """Refuse a chunk with NaN/Inf features before it is written, naming the likely cause."""
    bad = ~np.isfinite(feats.reshape(len(feats), -1)).all(axis=1)
    if bad.any():
        first_bad = start + int(np.flatnonzero(bad)[0])
        hint = "use --dtype float32 (float16 overflows)" if cfg.dtype == "float16" and \
            _finite_in_fp32(stem, split_data, first_bad, cfg) else "check the weights file"
        raise KtnasError(f"stem {stem.spec} produced NaN/Inf features for {int(bad.sum())} samples of split "
                         f"'{split}' (first: sample {first_bad}): {hint}; nothing bad was written")


def run_stem(stem, images: torch.Tensor, start: int, cfg: PrecomputeConfig, split: str, device, feat_shape):
    """Features [n, V, C, H, W] (numpy, stored dtype) of one chunk's images, in sub-batches from its start."""
    n = len(images)
    out = np.empty((n, cfg.views, *feat_shape), dtype=cfg.dtype)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.float16) if cuda and cfg.dtype == "float16" else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for b0 in range(0, n, cfg.batch_size):
            b1 = min(n, b0 + cfg.batch_size)
            x = stem.prepare(images[b0:b1].to(device, non_blocking=True))
            for v in range(cfg.views):
                xv = x if v == 0 else augment(x, range(start + b0, start + b1), v, cfg.seed, split)
                if cuda:
                    xv = xv.contiguous(memory_format=torch.channels_last)
                out[b0:b1, v] = stem.forward_prepared(xv).float().cpu().numpy().astype(cfg.dtype)
    return out


def _finite_in_fp32(stem, split_data, idx: int, cfg) -> bool:
    with torch.inference_mode():
        p = next(stem.parameters())
        f = stem(split_data.get_batch([idx]).to(p.device)).float()
    return bool(torch.isfinite(f).all()) and bool(f.abs().max() > np.finfo(np.float16).max)
