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
import hashlib
import json
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import datasets
from .datasets import augment
from .runtime import DEFAULT_OUT, resolve_device
from .errors import KtnasError
from .stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM, get_stem
from .store import (create_store, is_disk_full, disk_full_error, open_store, remove_store, store_exists,
                    store_lock)

DTYPES = ("float16", "float32")
CHUNK_BYTES = 8 << 20  # target uncompressed bytes per chunk when --chunk-size is not given


@dataclass
class PrecomputeConfig:
    """Everything ``ktnas precompute-features`` takes; the defaults are the embedded default job."""

    dataset: str = "fashion-mnist"
    stem: str = DEFAULT_STEM
    weights: str = "imagenet"
    image_size: int = DEFAULT_IMAGE_SIZE
    out: str = DEFAULT_OUT
    dtype: str = "float16"
    views: int = 1
    splits: tuple[str, ...] = ("train", "test")
    batch_size: int | None = None  # None: 64 on the CPU (cache-friendly), 256 on CUDA
    device: str = "auto"
    chunk_size: int | None = None
    compressor: str = "zstd"
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    data_root: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)


def parse_shard(text: str) -> tuple[int, int]:
    """``'1/4'`` -> (1, 4)."""
    try:
        i, n = (int(t) for t in str(text).split("/"))
    except ValueError:
        raise KtnasError(f"bad --shard '{text}': write it as I/N, e.g. 0/2 and 1/2 for two processes") from None
    if not (n >= 1 and 0 <= i < n):
        raise KtnasError(f"bad --shard '{text}': I must be in 0..N-1 (e.g. 0/2 and 1/2)")
    return i, n


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


def _request(cfg: PrecomputeConfig, stem, splits: dict, chunk_size: int) -> dict:
    """What defines the store's content: equal requests write equal stores (resume and shards check it)."""
    return dict(stem_fingerprint=stem.fingerprint, dataset=cfg.dataset,
                dataset_fingerprints={k: s.fingerprint for k, s in splits.items()}, limit=cfg.limit,
                views=cfg.views, dtype=cfg.dtype, chunk_size=chunk_size, compressor=cfg.compressor, seed=cfg.seed)


def _request_hash(req: dict) -> str:
    return hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()


def _open_or_create(cfg, attrs, shapes, chunk_size):
    """Create the store, or join/resume an existing one with the same request; refuse anything else."""
    out, (_, n_shards) = cfg.out, cfg.shard
    with store_lock(out):
        if store_exists(out):
            try:
                old = open_store(out, "a", require_complete=False)
            except KtnasError:
                if not cfg.overwrite:
                    raise
                old = None
            same = old is not None and old.attrs.get("request_hash") == attrs["request_hash"]
            sibling = same and not old.complete and n_shards > 1  # a store another shard of this run made
            if cfg.resume or sibling:
                if not same:
                    diff = _first_difference(old.attrs.get("request", {}), attrs["request"]) if old else "format"
                    raise KtnasError(f"cannot resume {out}: it was made with another {diff}; rerun with the "
                                     "original arguments, or pass --overwrite to replace it")
                return old
            if not cfg.overwrite:
                if old is not None:
                    old.close()
                raise KtnasError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
            if old is not None:
                old.close()
            remove_store(out)
        return create_store(out, attrs=attrs, splits=shapes, dtype=cfg.dtype, chunk_size=chunk_size,
                            compressor=cfg.compressor)


def _first_difference(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k} ({a.get(k)!r} there, {b.get(k)!r} now)"
    return "configuration"


def precompute(cfg: PrecomputeConfig | None = None, **overrides) -> dict:
    """Run the stem over the data set and write the store (see the module docstring). Returns a summary."""
    cfg = cfg or PrecomputeConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if cfg.dtype not in DTYPES:
        raise KtnasError(f"unknown --dtype '{cfg.dtype}': use float16 or float32")
    if cfg.views < 1 or (cfg.batch_size or 1) < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise KtnasError("--views, --batch-size and --limit must be positive integers")
    if cfg.resume and cfg.overwrite:
        raise KtnasError("--resume and --overwrite exclude each other: pick one")
    shard_i, n_shards = cfg.shard
    device = resolve_device(cfg.device)
    cfg.batch_size = cfg.batch_size or (256 if device.type == "cuda" else 64)

    splits = {s: datasets.load_split(cfg.dataset, s, root=cfg.data_root, image_size=cfg.image_size,
                                     seed=cfg.seed) for s in cfg.splits}
    stem = get_stem(cfg.stem, cfg.weights, cfg.image_size).to(device)
    cuda = device.type == "cuda"
    if cuda:
        stem = stem.to(memory_format=torch.channels_last)
    feat_shape = stem.output_shape
    counts = {s: len(d) if cfg.limit is None else min(cfg.limit, len(d)) for s, d in splits.items()}
    sample_bytes = cfg.views * int(np.prod(feat_shape)) * np.dtype(cfg.dtype).itemsize
    chunk_size = cfg.chunk_size or auto_chunk_size(sample_bytes, max(counts.values()))
    if chunk_size < 1:
        raise KtnasError("--chunk-size must be a positive integer")
    req = _request(cfg, stem, splits, chunk_size)
    first = next(iter(splits.values()))
    attrs = dict(stem.describe(), request=req, request_hash=_request_hash(req), dataset=cfg.dataset,
                 dataset_fingerprints=req["dataset_fingerprints"], num_classes=first.num_classes,
                 classes=list(first.classes), views=cfg.views, seed=cfg.seed, limit=cfg.limit,
                 augmentation=dict(view0="plain", others="random crop (zero pad image_size/8) + horizontal flip",
                                   seeded_by="(seed, split, sample index, view)"),
                 versions=_versions(), **cfg.extra)
    shapes = {s: (n, cfg.views, *feat_shape) for s, n in counts.items()}
    store = _open_or_create(cfg, attrs, shapes, chunk_size)

    split_handles = {s: store.split(s) for s in cfg.splits}
    todo = []
    for s, sp in split_handles.items():
        written = sp.written()
        todo += [(s, i) for i in range(sp.num_chunks) if i % n_shards == shard_i and not written[i]]
    n_images = sum(b - a for a, b in (split_handles[s].chunk_range(i) for s, i in todo))
    summary = dict(out=cfg.out, device=str(device), chunks_total=sum(sp.num_chunks for sp in split_handles.values()),
                   chunks_written=0, chunks_skipped=0, images=int(n_images), seconds=0.0)
    summary["chunks_skipped"] = summary["chunks_total"] - len(todo) if n_shards == 1 else 0

    bar = tqdm(total=n_images, unit="img", unit_scale=True, desc=f"precompute {stem.spec}",
               disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
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
            feats = run_stem(stem, images, a, cfg, s, device, feat_shape)
            bad = ~np.isfinite(feats.reshape(len(feats), -1)).all(axis=1)
            if bad.any():
                first_bad = a + int(np.flatnonzero(bad)[0])
                hint = "use --dtype float32 (float16 overflows)" if cfg.dtype == "float16" and \
                    _finite_in_fp32(stem, splits[s], first_bad, cfg) else "check the weights file"
                raise KtnasError(f"stem {stem.spec} produced NaN/Inf features for {int(bad.sum())} samples of split "
                                 f"'{s}' (first: sample {first_bad}): {hint}; nothing bad was written")
            writer.put((s, i, feats, labels.numpy(), bar.update))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.restore()
        pool.shutdown(wait=True, cancel_futures=True)
        try:
            writer.finish()  # whatever was computed is written, also on Ctrl-C
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(cfg.out, e, "a chunk") from None
            raise
        finally:
            bar.close()
    summary["chunks_written"] = writer.written
    summary["seconds"] = time.perf_counter() - t0
    summary["images_per_s"] = n_images / summary["seconds"] if summary["seconds"] > 0 and not interrupted else None
    if interrupted:
        store.close()
        print(f"interrupted: {writer.written} chunks written to {cfg.out}; rerun the same command with --resume "
              "to finish", file=sys.stderr)
        raise KeyboardInterrupt
    summary["complete"] = store.mark_complete_if_done()
    store.close()
    return summary


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
