"""``ktnas bench store``: what each backend's compressor costs and saves, on identical real stem features.

The store is ``--features`` or, by default, one built here as ``ktnas bench loader`` builds it (Fashion-MNIST
train images through the default stem at 64 px, float16). Its first ``samples`` samples are read into memory
once, then written, chunk by chunk with the source's chunking, into a fresh store of every asked backend and
compressor (zstd level 1; deflate level 1 after the byte shuffle filter; lzf; none). For each one:

- ``stored``: bytes of the features on disk and the ratio raw / stored;
- ``write MB/s``: 10^6 bytes of features (stored dtype) per second of ``StoreSplit.write_chunk`` calls,
  precompute's own write path (features, labels, the chunk's written flag; HDF5 flushes every chunk);
- ``read MB/s``: the chunks read back in order by ``read_chunk``, one thread (decompression bound, page cache
  warm), and ``loader samples/s``: one shuffled ``FeatureLoader`` streaming epoch, what a search consumes;
  both the median of ``epochs`` rounds run round robin after a warm-up;
- ``plain reader``: whether the store opens and decodes in a fresh Python that imports only ``h5py`` (HDF5;
  no ``hdf5plugin``) or only ``zarr`` (Zarr): what another tool sees.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ktnas.cache.backends import BACKEND_COMPRESSORS, BACKENDS
from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import resolve_device
from ktnas.cache.store import DEFAULT_COMPRESSOR, create_store, open_store
from ktnas.cache.stream import FeatureLoader

from .loader import DEFAULT_SAMPLES, loader_epoch, measure, raw_epoch, add_build_arguments, source_store
from .report import Column, Report, rate

HELP = "size, write and read speed of each backend and compressor (zstd, gzip, lzf, none) on real features"
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}


def add_arguments(p) -> None:
    p.add_argument("--features", default=None, metavar="STORE",
                   help="an existing store (.zarr or .h5); default: build one from real stem features")
    p.add_argument("--split", default="train", help="split to copy (default: %(default)s)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"samples (default: {DEFAULT_SAMPLES} when building, all of the split of --features)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: %(default)s)")
    p.add_argument("--compressors", default=None,
                   help="comma-separated (default: every one the backend writes: zarr "
                        f"{'/'.join(BACKEND_COMPRESSORS['zarr'])}, hdf5 {'/'.join(BACKEND_COMPRESSORS['hdf5'])})")
    p.add_argument("--epochs", type=int, default=3, help="timed read rounds after one warm-up; the median counts")
    p.add_argument("--batch-size", type=int, default=256, help="loader batch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="FeatureLoader reader threads (default: %(default)s)")
    add_build_arguments(p)


def _cases(backends: str, compressors: str | None) -> list[tuple[str, str]]:
    """(backend, compressor) pairs asked for, refused in one line when a backend cannot write one."""
    out = []
    for b in (x for x in backends.split(",") if x):
        if b not in BACKENDS:
            raise KtnasError(f"unknown backend '{b}' in --backends: use {', '.join(BACKENDS)}")
        asked = compressors.split(",") if compressors else BACKEND_COMPRESSORS[b]
        for c in (x for x in asked if x):
            if c not in BACKEND_COMPRESSORS[b]:
                raise KtnasError(f"{b} stores cannot use compressor '{c}': pick from "
                                 f"{', '.join(BACKEND_COMPRESSORS[b])} (or leave --compressors out)")
            out.append((b, c))
    if not out:
        raise KtnasError("nothing to measure: pass --backends zarr,hdf5 (and --compressors, or none for all)")
    return out


def _write(chunks, attrs, shape, dtype, chunk_size, split, path, compressor) -> float:
    """Write ``chunks`` [(features, labels)] into a new store at ``path``; seconds spent in write_chunk."""
    with create_store(path, attrs=attrs, splits={split: shape}, dtype=dtype, chunk_size=chunk_size,
                      compressor=compressor) as d:
        sp, spent = d.split(split), 0.0
        for i, (f, y) in enumerate(chunks):
            t0 = time.perf_counter()
            sp.write_chunk(i, f, y)
            spent += time.perf_counter() - t0
        d.mark_complete_if_done()
    return spent


PLAIN = {"hdf5": "import sys, h5py\nwith h5py.File(sys.argv[1], 'r') as f: f[sys.argv[2] + '/features'][:1]",
         "zarr": "import sys, zarr\nzarr.open_group(sys.argv[1], mode='r')[sys.argv[2] + '/features'][:1]"}


def plain_reader_opens(path, backend: str, split: str = "train") -> bool:
    """Whether a fresh Python importing only h5py (HDF5) or zarr (Zarr) decodes the store's first sample."""
    r = subprocess.run([sys.executable, "-c", PLAIN[backend], str(path), split], capture_output=True, timeout=120)
    return r.returncode == 0


def bench_store(features=None, *, split: str = "train", samples: int | None = None, backends: str = "zarr,hdf5",
                compressors: str | None = None, epochs: int = 3, batch_size: int = 256, workers: int = 2,
                dataset: str = "fashion-mnist", stem: str | None = None, weights: str = "imagenet",
                image_size: int | None = None, chunk_size: int | None = None, work_dir=None,
                notes: list | None = None) -> list[dict]:
    """Rows ``{backend, compressor, default, stored_bytes, ratio, write_mb_per_s, read_mb_per_s,
    loader_samples_per_s, plain_reader, ...}``, one per (backend, compressor); see the module docstring."""
    for name, v in (("samples", samples or 1), ("epochs", epochs), ("batch_size", batch_size), ("workers", workers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KtnasError(f"{name} must be an integer >= 1, got {v!r}: pass a positive {name}")
    cases = _cases(backends, compressors)
    notes = [] if notes is None else notes
    samples = samples or (DEFAULT_SAMPLES if features is None else None)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-store-", dir=work_dir))
    build = {k: v for k, v in dict(dataset=dataset, stem=stem, weights=weights, image_size=image_size,
                                   chunk_size=chunk_size, device="cpu").items() if v is not None}
    try:
        with open_store(source_store(features, split, samples, tmp, build, notes)) as src:
            sp = src.split(split)
            n = len(sp) if samples is None else min(samples, len(sp))
            chunks = [sp.read_chunk(i) for i in range(-(-n // sp.chunk_size))]
            chunks[-1] = tuple(a[:n - (len(chunks) - 1) * sp.chunk_size] for a in chunks[-1])
            layout = dict(attrs=src.attrs, shape=(n, *sp.sample_shape), dtype=str(sp.dtype),
                          chunk_size=sp.chunk_size, split=split)
            raw = sum(f.nbytes for f, _ in chunks)
            notes.append(f"features [{n}, {', '.join(map(str, sp.sample_shape))}] {sp.dtype}, chunks of "
                         f"{sp.chunk_size} samples, {raw / 2**20:.1f} MiB raw")
        rows = [_one(b, c, chunks, layout, tmp, raw) for b, c in cases]
        _time_reads(rows, split, n, epochs, batch_size, workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _one(backend, compressor, chunks, layout, tmp, raw) -> dict:
    path = tmp / f"{compressor}{SUFFIX[backend]}"
    spent = _write(chunks, path=path, compressor=compressor, **layout)
    with open_store(path) as s:
        stored = s.split(layout["split"]).stored_bytes()
        size = s.size_on_disk()
    return dict(backend=backend, compressor=compressor, default=DEFAULT_COMPRESSOR[backend] == compressor,
                path=str(path), raw_bytes=raw, stored_bytes=stored, size_on_disk=size, ratio=raw / stored,
                write_s=spent, write_mb_per_s=raw / spent / 1e6,
                plain_reader=plain_reader_opens(path, backend, layout["split"]))


def _time_reads(rows, split, n, epochs, batch_size, workers) -> None:
    """Add the read rates to ``rows`` (raw read_chunk and one streaming loader epoch, round robin)."""
    cases, opened = [], []
    try:
        for r in rows:
            st = open_store(r["path"])
            opened.append(st)
            sp = st.split(split)
            cases.append((dict(row=r, kind="read"), functools.partial(raw_epoch, sp, n)))
            loader = FeatureLoader(st, split, batch_size=batch_size, shuffle=True, device=resolve_device("cpu"),
                                   workers=workers, indices=None if n == len(sp) else np.arange(n), in_memory=False)
            opened.append(loader)
            cases.append((dict(row=r, kind="loader"), functools.partial(loader_epoch, loader, sp)))
        for m in measure(cases, epochs):
            r = m["row"]
            if m["kind"] == "read":
                r.update(read_mb_per_s=m["mb_per_s"], read_epochs_s=m["epochs_s"])
            else:
                r.update(loader_samples_per_s=m["samples_per_s"], loader_epochs_s=m["epochs_s"])
    finally:
        for o in reversed(opened):
            o.close()
    for r in rows:
        del r["path"]


COLUMNS = [Column("backend", "backend"), Column(None, "compressor",
                                                lambda r: r["compressor"] + (" (default)" if r["default"] else "")),
           Column("stored_bytes", "stored MiB", lambda v: f"{v / 2**20:,.1f}"),
           Column("ratio", "ratio", lambda v: f"{v:.2f}x"),
           Column("write_mb_per_s", "write MB/s", lambda v: f"{v:,.0f}"),
           Column("read_mb_per_s", "read MB/s", lambda v: f"{v:,.0f}"),
           Column("loader_samples_per_s", "loader samples/s", rate),
           Column("plain_reader", "plain h5py / zarr", lambda v: "opens" if v else "fails")]


def _chart(axes, rows) -> None:
    labels = [f"{r['backend']} {r['compressor']}" for r in rows]
    y = np.arange(len(rows))[::-1]
    for ax, key, title in ((axes[0], "stored_bytes", "stored MiB (lower is better)"),
                           (axes[1], "write_mb_per_s", "write MB/s"), (axes[2], "read_mb_per_s", "read MB/s")):
        vals = [r[key] / 2**20 if key == "stored_bytes" else r[key] for r in rows]
        bars = ax.barh(y, vals, color=["tab:green" if r["plain_reader"] else "tab:orange" for r in rows])
        ax.set_yticks(y, labels if ax is axes[0] else [""] * len(rows), fontsize=8)
        for b, v in zip(bars, vals):
            ax.annotate(f" {v:,.0f}", (b.get_width(), b.get_y() + b.get_height() / 2), va="center", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.margins(x=0.25)
    axes[0].set_xlabel("green: opens in plain h5py / zarr; orange: needs a plugin", fontsize=7)


def report(args, work_dir=None) -> Report:
    """Run :func:`bench_store` with the CLI's arguments."""
    notes: list[str] = []
    rows = bench_store(args.features, split=args.split, samples=args.samples, backends=args.backends,
                       compressors=args.compressors, epochs=args.epochs, batch_size=args.batch_size,
                       workers=args.workers, dataset=args.dataset, stem=args.stem, weights=args.weights,
                       image_size=args.image_size, chunk_size=args.chunk_size, work_dir=work_dir, notes=notes)
    notes += ["zstd: level 1; gzip: deflate level 1 after the byte shuffle filter (HDF5), deflate level 1 (Zarr); "
              "lzf: h5py's filter; every store written by precompute's own write path (write_chunk), same chunks",
              f"read: read_chunk in order, one thread; loader: one shuffled FeatureLoader epoch, {args.workers} "
              f"reader threads, batch {args.batch_size}; median of {args.epochs} rounds after a warm-up, page cache "
              "warm", "plain h5py / zarr: a fresh Python importing only h5py (no hdf5plugin) or zarr decodes it"]
    return Report("store", "ktnas bench store: what each compressor costs and saves", rows, COLUMNS, _chart,
                  device="cpu", notes=notes, chart_panels=3)
