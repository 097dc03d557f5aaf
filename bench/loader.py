"""``ktnas bench loader``: how fast one epoch of cached features comes out of a store.

The store is ``--features`` or, by default, one built here from real stem features in the default embedded
job's shape: Fashion-MNIST train images through ``mobilenet_v2:features.3`` at 64 px, features
``[N, 1, 24, 16, 16]`` float16, Zarr + zstd, chunks of ~8 MiB (what ``precompute`` picks). The same array is
copied into a store of the other backend, so both are measured on identical data. For each backend:

- ``FeatureLoader`` streaming (``in_memory=False``) and in memory (``in_memory=True``), shuffled as in a search,
  features cast to float32 on the device;
- the raw sequential read rate of the same chunks: one thread calling ``read_chunk``, no loader (the ceiling).

Each case runs one warm-up epoch (for in-memory loaders it includes loading the samples; it warms the page
cache for all), then ``epochs`` rounds run every case's epoch in turn (round robin, so the machine's slow
moments spread over all cases). The median epoch gives ``samples_per_s`` and ``mb_per_s`` (10^6 bytes of
features delivered, counted in the stored dtype); ``vs_ceiling`` is the rate over the raw read rate of the same
backend.
"""
from __future__ import annotations

import contextlib
import functools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ktnas.cache.errors import KtnasError
from ktnas.cache.precompute import PrecomputeConfig, precompute
from ktnas.cache.runtime import resolve_device
from ktnas.cache.stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM
from ktnas.cache.backends import BACKEND_COMPRESSORS
from ktnas.cache.store import create_store, detect_backend, open_store
from ktnas.cache.stream import FeatureLoader

from .report import Column, Report, rate

HELP = "samples/s and MB/s of FeatureLoader epochs (zarr, hdf5, in memory) against raw chunk reads"
DEFAULT_SAMPLES = 20000
STREAM, MEMORY, CEILING = "FeatureLoader stream", "FeatureLoader in-memory", "read_chunk loop (ceiling)"


def add_arguments(p) -> None:
    p.add_argument("--features", default=None, metavar="STORE",
                   help="an existing store (.zarr or .h5); default: build one from real stem features")
    p.add_argument("--split", default="train", help="split to read (default: %(default)s)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"samples per epoch (default: {DEFAULT_SAMPLES} when building, all of the split of --features)")
    p.add_argument("--batch-size", type=int, default=256, help="loader batch (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up; the median counts")
    p.add_argument("--workers", type=int, default=2, help="FeatureLoader reader threads (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda: where batches go (default: auto)")
    add_build_arguments(p)


def add_build_arguments(p, chunk_size: bool = True) -> None:
    """The options that build the measured store when ``--features`` is not given (``--chunk-size`` too when
    ``chunk_size``)."""
    g = p.add_argument_group("building the store (without --features)")
    g.add_argument("--dataset", default="fashion-mnist", help="images to run the stem over (default: %(default)s)")
    g.add_argument("--stem", default=DEFAULT_STEM, help="ARCH:CUT (default: %(default)s)")
    g.add_argument("--weights", default="imagenet", help="imagenet | none | PATH (default: %(default)s)")
    g.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="stem input size (default: %(default)s)")
    if chunk_size:
        g.add_argument("--chunk-size", type=int, default=None, help="samples per chunk (default: precompute's ~8 MiB)")


def copy_store(src, dst, split: str = "train", limit: int | None = None) -> str:
    """Copy the first ``limit`` samples (default: all) of one split of store ``src`` into a new store ``dst``
    (backend from its suffix), chunk by chunk, with the same chunking, dtype and attributes, and the same compressor
    where the other backend writes it (else that backend's default)."""
    with open_store(src) as s:
        sp = s.split(split)
        n = len(sp) if limit is None else min(limit, len(sp))
        comp = s.attrs.get("compressor")
        comp = comp if comp in BACKEND_COMPRESSORS[detect_backend(dst)] else None  # else the backend's default
        with create_store(dst, attrs=s.attrs, splits={split: (n, *sp.sample_shape)}, dtype=str(sp.dtype),
                          chunk_size=sp.chunk_size, compressor=comp) as d:
            dsp = d.split(split)
            for i in range(dsp.num_chunks):
                feats, labels = sp.read_chunk(i)
                m = dsp.chunk_range(i)[1] - dsp.chunk_range(i)[0]
                dsp.write_chunk(i, feats[:m], labels[:m])
            d.mark_complete_if_done()
    return str(dst)


def source_store(features, split, samples, tmp: Path, build: dict, notes: list) -> str:
    """The store to measure: ``features``, or one built under ``tmp`` from ``samples`` real stem features."""
    if features is not None:
        notes.append(f"store: {features}")
        return str(features)
    src = str(tmp / "features.zarr")
    print(f"ktnas bench: building a store of {samples} {build['dataset']} {split} samples through "
          f"{build['stem']} (weights {build['weights']}) at {build['image_size']} px ...", file=sys.stderr)
    made = precompute(PrecomputeConfig(out=src, splits=(split,), limit=samples, progress=False, **build))
    notes.append(f"store: built here from real stem features: {build['dataset']} {split}[:{made['images']}] "
                 f"through {build['stem']} (weights {build['weights']}) at {build['image_size']} px")
    return src


def _stores(features, split, samples, tmp: Path, build: dict, notes: list) -> dict[str, str]:
    """{backend: path} of the two stores to measure: the given or built one, and its copy in the other backend."""
    src = source_store(features, split, samples, tmp, build, notes)
    other = "hdf5" if detect_backend(src) == "zarr" else "zarr"
    notes.append(f"copied here to {other}")
    dst = copy_store(src, tmp / f"copy{'.h5' if other == 'hdf5' else '.zarr'}", split, samples)
    return dict(sorted({detect_backend(src): src, other: dst}.items(), key=lambda kv: kv[0] != "zarr"))


def measure(cases: list, epochs: int) -> list[dict]:
    """Time ``cases`` [(row fields, epoch_fn(epoch) -> (samples, bytes))]: each runs one warm-up epoch, then
    ``epochs`` rounds run every case once (round robin, so the machine's slow moments spread over all cases);
    the median epoch of each gives its rates."""
    warm, times, done = [], [[] for _ in cases], [None] * len(cases)
    for _, fn in cases:
        t0 = time.perf_counter()
        fn(0)
        warm.append(time.perf_counter() - t0)
    for e in range(1, epochs + 1):
        for i, (_, fn) in enumerate(cases):
            t0 = time.perf_counter()
            done[i] = fn(e)
            times[i].append(time.perf_counter() - t0)
    rows = []
    for (fields, _), w, t, (n, nbytes) in zip(cases, warm, times, done):
        med = statistics.median(t)
        rows.append(dict(fields, samples_per_s=n / med, mb_per_s=nbytes / med / 1e6, epoch_s=med, samples=n,
                         warmup_s=w, epochs_s=t))
    return rows


def loader_epoch(loader: FeatureLoader, sp, epoch: int) -> tuple[int, int]:
    """One epoch of ``loader``: (samples, bytes of their features in the stored dtype, one view each)."""
    loader.set_epoch(epoch)
    count = 0
    for _, labels in loader:
        count += labels.shape[0]
    if loader.device.type == "cuda":
        torch.cuda.synchronize(loader.device)
    return count, count * int(np.prod(sp.sample_shape[1:])) * sp.dtype.itemsize


def raw_epoch(sp, n: int, epoch: int) -> tuple[int, int]:
    """read_chunk over the chunks holding the first ``n`` samples, in order: (samples, bytes) of those samples
    (a partial last chunk is read whole)."""
    count = nbytes = 0
    for c in range(-(-n // sp.chunk_size)):
        feats, _ = sp.read_chunk(c)
        m = min(n, sp.chunk_range(c)[1]) - sp.chunk_range(c)[0]
        count, nbytes = count + m, nbytes + feats[:m].nbytes
    return count, nbytes


def bench_loader(features=None, *, split: str = "train", samples: int | None = None, batch_size: int = 256,
                 epochs: int = 3, workers: int = 2, device: str = "auto", dataset: str = "fashion-mnist",
                 stem: str = DEFAULT_STEM, weights: str = "imagenet", image_size: int = DEFAULT_IMAGE_SIZE,
                 chunk_size: int | None = None, work_dir=None, notes: list | None = None) -> list[dict]:
    """Rows ``{source, backend, in_memory, samples_per_s, mb_per_s, epoch_s, batch_size, device, ...}`` for
    streaming, in-memory and raw chunk reads of each backend (see the module docstring). ``features`` is a store
    path, or None to build one (``dataset``, ``stem``, ``weights``, ``image_size``, ``chunk_size``). Temporary
    stores go under ``work_dir`` (default: the system's temp folder) and are removed. Lines describing the store
    are appended to ``notes`` when given."""
    for name, v in (("samples", samples or 1), ("batch_size", batch_size), ("epochs", epochs), ("workers", workers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KtnasError(f"{name} must be an integer >= 1, got {v!r}: pass a positive {name}")
    dev = resolve_device(device)
    notes = [] if notes is None else notes
    if features is None:
        samples = samples or DEFAULT_SAMPLES
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-loader-", dir=work_dir))
    build = dict(dataset=dataset, stem=stem, weights=weights, image_size=image_size, device=str(dev),
                 chunk_size=chunk_size)
    cases = []
    try:
        with contextlib.ExitStack() as stack:
            for backend, path in _stores(features, split, samples, tmp, build, notes).items():
                st = stack.enter_context(open_store(path))
                sp = st.split(split)
                n = len(sp) if samples is None else min(samples, len(sp))
                stored = sp.stored_bytes()
                notes.append(f"{backend}: features {list(sp.shape)} {sp.dtype}, chunks of {sp.chunk_size} samples "
                             f"({sp.chunk_size * sp.nbytes() / len(sp) / 2**20:.1f} MiB), "
                             f"{st.attrs.get('compressor', '?')}, {sp.nbytes() / 2**20:.1f} MiB raw, "
                             f"{stored / 2**20:.1f} MiB stored ({sp.nbytes() / max(stored, 1):.2f}x)")
                for in_memory in (False, True):
                    loader = stack.enter_context(FeatureLoader(
                        st, split, batch_size=batch_size, shuffle=True, device=dev, workers=workers,
                        indices=None if n == len(sp) else np.arange(n), in_memory=in_memory))
                    fields = dict(source=MEMORY if in_memory else STREAM, backend=backend, in_memory=in_memory,
                                  batch_size=batch_size, device=str(dev))
                    cases.append((fields, functools.partial(loader_epoch, loader, sp)))
                fields = dict(source=CEILING, backend=backend, in_memory=False, batch_size=sp.chunk_size,
                              device="cpu")
                cases.append((fields, functools.partial(raw_epoch, sp, n)))
            rows = measure(cases, epochs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ceiling = {r["backend"]: r["samples_per_s"] for r in rows if r["source"] == CEILING}
    for r in rows:
        r["vs_ceiling"] = r["samples_per_s"] / ceiling[r["backend"]]
    return rows


COLUMNS = [Column("backend", "backend"), Column("source", "source"),
           Column("in_memory", "in_memory", lambda v: "yes" if v else "no"),
           Column("samples_per_s", "samples/s", rate), Column("mb_per_s", "MB/s", lambda v: f"{v:,.1f}"),
           Column("vs_ceiling", "vs ceiling", lambda v: f"{v:.2f}"),
           Column("epoch_s", "epoch s", lambda v: f"{v:.3f}"),
           Column("warmup_s", "warm-up s", lambda v: f"{v:.3f}"), Column("batch_size", "batch"),
           Column("device", "device")]


def _chart(ax, rows) -> None:
    colors = {STREAM: "tab:blue", MEMORY: "tab:green", CEILING: "tab:gray"}
    labels = [f"{r['backend']}: {r['source']}" for r in rows]
    y = np.arange(len(rows))[::-1]
    bars = ax.barh(y, [r["samples_per_s"] for r in rows], color=[colors[r["source"]] for r in rows])
    ax.set_yticks(y, labels, fontsize=8)
    for b, r in zip(bars, rows):
        ax.annotate(f" {rate(r['samples_per_s'])}/s, {r['mb_per_s']:,.0f} MB/s",
                    (b.get_width(), b.get_y() + b.get_height() / 2), va="center", fontsize=8)
    ax.set_xlabel("samples/s (median epoch after a warm-up)")
    ax.margins(x=0.2)


def report(args, work_dir=None) -> Report:
    """Run :func:`bench_loader` with the CLI's arguments."""
    notes: list[str] = []
    rows = bench_loader(args.features, split=args.split, samples=args.samples, batch_size=args.batch_size,
                        epochs=args.epochs, workers=args.workers, device=args.device, dataset=args.dataset,
                        stem=args.stem, weights=args.weights, image_size=args.image_size,
                        chunk_size=args.chunk_size, work_dir=work_dir, notes=notes)
    notes += [f"each: one warm-up epoch (in memory: includes loading the samples), then {args.epochs} timed "
              "round(s) running every row's epoch in turn; the median epoch counts; page cache warm",
              "MB/s: 10^6 bytes of features delivered, in the stored dtype; vs ceiling: samples/s over the raw "
              "read_chunk rate of the same backend (one thread, chunk by chunk, no loader; its batch is the chunk)",
              f"loader: shuffled, {args.workers} reader threads, features cast to float32 on the device"]
    return Report("loader", "ktnas bench loader: one epoch of cached features", rows, COLUMNS, _chart,
                  device=rows[0]["device"], notes=notes)
