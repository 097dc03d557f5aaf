"""``ktnas bench precompute``: does writing the store cost anything beyond running the stem?

In one run, over the same first N images of the train split, cut into the same chunks and batches:

- (a) the stem alone: ``run_stem`` chunk by chunk, exactly what ``precompute`` runs (prepare +
  forward_prepared under inference_mode, features copied to host memory in the stored dtype), no store;
- (b) the whole ``precompute`` into a fresh store (progress bar off), whose writer thread should hide the
  compression and disk writes behind the stem. Its rate is precompute's own: from its first chunk to its last
  write, not counting loading the data set, building the stem or creating the store.

After an untimed warm-up batch the two alternate (a, b, a, b, ...) ``repeats`` times; the best of each counts
and every raw number is kept, so the noise is visible. ``ratio`` = best (b) / best (a); the target is >= 0.9.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ktnas.cache.datasets import load_split
from ktnas.cache.errors import KtnasError
from ktnas.cache.precompute import PrecomputeConfig, auto_chunk_size, precompute, run_stem
from ktnas.cache.runtime import resolve_device
from ktnas.cache.stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM, get_stem
from ktnas.cache.store import COMPRESSORS, inspect_store, remove_store, resolve_compressor

from .report import Column, Report, rate

HELP = "images/s of the stem alone against the full precompute into a store (the writer should hide writes)"
TARGET = 0.9


def add_arguments(p) -> None:
    p.add_argument("--dataset", default="fashion-mnist", help="images (train split) (default: %(default)s)")
    p.add_argument("--stem", default=DEFAULT_STEM, help="ARCH:CUT (default: %(default)s)")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | PATH (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="stem input size (default: %(default)s)")
    p.add_argument("--samples", type=int, default=4096, help="images per measurement (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="stem batch (default: precompute's, 64 CPU / 256 CUDA)")
    p.add_argument("--chunk-size", type=int, default=None, help="samples per chunk (default: precompute's ~8 MiB)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--backend", default="zarr", choices=("zarr", "hdf5"), help="store backend (default: zarr)")
    p.add_argument("--compressor", default=None, choices=COMPRESSORS,
                   help="store compressor (default: the backend's, as precompute)")
    p.add_argument("--repeats", type=int, default=2, help="alternating (a, b) rounds; the best counts (default: 2)")


def _check(samples, batch_size, chunk_size, repeats, backend) -> None:
    """The arguments checked: one-line KtnasErrors."""
    for name, v in (("samples", samples), ("batch_size", batch_size or 1), ("chunk_size", chunk_size or 1),
                    ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KtnasError(f"{name} must be an integer >= 1, got {v!r}: pass a positive {name}")
    if backend not in ("zarr", "hdf5"):
        raise KtnasError(f"unknown backend '{backend}': use zarr or hdf5")


def bench_precompute(*, dataset: str = "fashion-mnist", stem: str = DEFAULT_STEM, weights: str = "imagenet",
                     image_size: int = DEFAULT_IMAGE_SIZE, samples: int = 4096, batch_size: int | None = None,
                     chunk_size: int | None = None, device: str = "auto", backend: str = "zarr", repeats: int = 2,
                     work_dir=None, compressor: str | None = None) -> dict:
    """One row ``{stem, image_size, samples, device, stem_images_per_s, precompute_images_per_s, ratio, backend,
    stem_runs, precompute_runs, ...}`` (see the module docstring). Temporary stores go under ``work_dir``
    (default: the system's temp folder) and are removed."""
    _check(samples, batch_size, chunk_size, repeats, backend)
    suffix = ".h5" if backend == "hdf5" else ".zarr"
    compressor = resolve_compressor("features" + suffix, compressor)
    dev = resolve_device(device)
    data = load_split(dataset, "train", image_size=image_size)
    n = min(samples, len(data))
    net = get_stem(stem, weights, image_size).to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    feat_shape = net.output_shape
    cfg = PrecomputeConfig(dataset=dataset, stem=stem, weights=weights, image_size=image_size, splits=("train",),
                           limit=n, device=str(dev), progress=False, overwrite=True, compressor=compressor,
                           batch_size=batch_size or (256 if dev.type == "cuda" else 64))
    cfg.chunk_size = chunk_size or auto_chunk_size(int(np.prod(feat_shape)) * np.dtype(cfg.dtype).itemsize, n)
    cs = cfg.chunk_size
    chunks = [(a, data.get_batch(slice(a, min(a + cs, n)))) for a in range(0, n, cs)]

    def stem_rate() -> float:
        t0 = time.perf_counter()
        for a, images in chunks:
            run_stem(net, images, a, cfg, "train", dev, feat_shape)
        return n / (time.perf_counter() - t0)

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-precompute-", dir=work_dir))
    store_info = {}

    def precompute_rate(i: int) -> float:
        out = str(tmp / f"features-{i}{suffix}")
        with warnings.catch_warnings():  # get_stem already warned about --weights none once
            warnings.filterwarnings("ignore", message=".*uses random weights")
            summary = precompute(replace(cfg, out=out))
        info = inspect_store(out)["splits"]["train"]
        store_info.update(stored=info["stored_bytes"], raw=info["nbytes"])
        remove_store(out)
        return summary["images_per_s"]

    a_runs, b_runs = [], []
    try:
        run_stem(net, chunks[0][1][:cfg.batch_size], 0, cfg, "train", dev, feat_shape)  # warm-up, untimed
        for i in range(repeats):
            a_runs.append(stem_rate())
            b_runs.append(precompute_rate(i))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = max(a_runs), max(b_runs)
    return dict(stem=net.spec, image_size=image_size, samples=n, device=str(dev), stem_images_per_s=a,
                precompute_images_per_s=b, ratio=b / a, backend=backend, stem_runs=a_runs, precompute_runs=b_runs,
                dataset=dataset, weights=weights, batch_size=cfg.batch_size, chunk_size=cs, dtype=cfg.dtype,
                compressor=cfg.compressor, store_raw_bytes=store_info["raw"], store_bytes=store_info["stored"])


def _runs(key):
    return lambda r: f"{rate(r[key + '_images_per_s'])} ({' / '.join(rate(v) for v in r[key + '_runs'])})"


COLUMNS = [Column("stem", "stem"), Column("image_size", "image px"), Column("samples", "samples"),
           Column("device", "device"), Column("backend", "backend"), Column("compressor", "compressor"),
           Column(None, "stem images/s: best (runs)", _runs("stem")),
           Column(None, "precompute images/s: best (runs)", _runs("precompute")),
           Column("ratio", f"ratio (target >= {TARGET})", lambda v: f"{v:.3f}")]


def _chart(ax, rows) -> None:
    r = rows[0]
    names = ["(a) stem alone", f"(b) precompute -> {r['backend']} {r['compressor']}"]
    ax.bar(names, [r["stem_images_per_s"], r["precompute_images_per_s"]], color=["tab:gray", "tab:blue"], width=0.5)
    for x, key in enumerate(("stem_runs", "precompute_runs")):
        ax.plot([x] * len(r[key]), r[key], "ko", ms=4, label="each run" if x == 0 else None)
    ax.axhline(TARGET * r["stem_images_per_s"], color="tab:red", ls="--", lw=1,
               label=f"target: {TARGET} x stem")
    ax.set_ylabel("images/s (bars: best run)")
    ax.set_xlabel(f"{r['stem']} at {r['image_size']} px, {r['samples']} images, batch {r['batch_size']}, "
                  f"{r['device']}: ratio {r['ratio']:.3f}")
    ax.legend(loc="lower right", fontsize=8)


def report(args, work_dir=None) -> Report:
    """Run :func:`bench_precompute` with the CLI's arguments."""
    row = bench_precompute(dataset=args.dataset, stem=args.stem, weights=args.weights, image_size=args.image_size,
                           samples=args.samples, batch_size=args.batch_size, chunk_size=args.chunk_size,
                           device=args.device, backend=args.backend, repeats=args.repeats, work_dir=work_dir,
                           compressor=args.compressor)
    notes = [f"data: {row['dataset']} train[:{row['samples']}], weights {row['weights']}, "
             f"stem batch {row['batch_size']}, chunks of {row['chunk_size']} samples, {row['dtype']} features, "
             f"{row['compressor']}: "
             f"{row['store_raw_bytes'] / 2**20:.1f} MiB raw, {row['store_bytes'] / 2**20:.1f} MiB stored",
             "(a) stem alone: precompute's run_stem over the same chunks and batches, no store; (b) the whole "
             "precompute into a fresh store (its own rate: first chunk to last write)",
             f"alternated a, b x {args.repeats} after an untimed warm-up batch; best of each counts, runs in "
             "brackets in measurement order; ratio = best (b) / best (a)"]
    return Report("precompute", "ktnas bench precompute: stem alone vs precompute into a store", [row], COLUMNS,
                  _chart, device=row["device"], notes=notes)
