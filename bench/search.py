"""``ktnas bench search``: one search step of classic DARTS against KT-NAS, configuration by configuration.

In one process and one run, for every space (``darts``, ``nb201``) and algorithm (``darts-1``, ``darts-2``:
DARTS first and second order; ``pcdarts``; ``gdas``), at the same batch size (the papers': 64, 64, 256, 64), it
times the search step -- exactly ``ktnas search``'s own step, ``_Run.search_step``: DARTS / PC-DARTS an
architecture step on a validation batch then a weight step on a training batch, GDAS a weight step and an
architecture step each under its own Gumbel sample -- of these configurations:

- ``baseline``: classic DARTS, ``--stem none``: DARTS' 3x3 conv stem and the classic search network (DARTS 8
  cells, C=16; NB201 17 positions, C=16) on 32x32 images of the store's data set (Fashion-MNIST's 28x28 are
  zero-padded to 32x32, larger images resized; normalised per channel), held in host memory and copied to the
  device batch by batch (as ``ktnas search --stem none``);
- ``stem-on-the-fly``: KT-NAS, the store's frozen stem run on each batch of the same samples' raw images (uint8 in
  host memory, copied batch by batch; the stem's own preprocessing on the device: to float, 3 channels, resized
  to its image size, ImageNet normalisation; no gradient), its features into the KT-NAS supernet (the classic
  network without the cells above the stem's resolution: for 16x16 features, DARTS 5 cells at C=32);
- ``cached``: the same supernet on cached features streamed from the store on disk (``FeatureLoader``,
  ``in_memory=False``; the page cache is warm after the first read), row ``source: disk``; and again with the
  features held in device memory (``in_memory=True``: GPU memory on CUDA), row ``source: memory`` (selected as
  ``--configs cached-memory``), so the cost of streaming is read off one run (``stream_overhead``);
- ``cached-fused``: as ``cached`` (disk), with the fused Triton mixed ops (``--kernels triton``). CUDA only (on the
  CPU the kernels run only under Triton's interpreter, far too slow to time); when the kernels refuse a variant
  (a one-line KtnasError) the row is skipped with that reason;
- ``cached-fused-graph``: as ``cached-fused``, with the whole step captured in one CUDA graph (static input
  buffers, a warm-up of 3 steps on a side stream, capturable Adam, autocast without its cast cache) and replayed
  each step: no kernel-launch overhead. CUDA only; GDAS (host-side sampling and per-edge control flow) cannot be
  captured; a capture that fails makes a skipped row with the error, not a crash.

Every configuration gets a freshly seeded network and optimisers; KT-NAS configurations are the same network
(same layout and parameters), only their input arrives differently. Each runs ``warmup`` untimed steps, then
``steps`` timed ones; a step's time runs from fetching its two batches (and running the stem, for
``stem-on-the-fly``) to the end of the step (CUDA synchronised). ``step_ms`` is the median, ``samples_per_s`` =
batch / median step. Memory: on CUDA ``torch.cuda.max_memory_allocated`` (its peak reset before each
configuration, everything of the previous one freed first); on the CPU the peak resident set size of the process
during the configuration (Linux: the high-water mark reset through ``/proc/self/clear_refs`` before it, freed
memory handed back with ``malloc_trim``); as RSS includes the Python/torch runtime common to all rows, the CPU's
``mem_ratio`` compares the increases over the RSS at the configuration's start (``mem_increase_bytes``).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ktnas.cache.datasets import load_split
from ktnas.cache.errors import KtnasError
from ktnas.cache.precompute import PrecomputeConfig, precompute, resolve_device
from ktnas.cache.stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM
from ktnas.cache.store import open_store, store_exists
from ktnas.cache.stream import FeatureLoader
from ktnas.engine.search import (PAPER_DEFAULTS, ImageBatches, SearchConfig, _hash, _Run, _seed_all, _split_indices,
                                 choose_batch_size, parse_size, resolve_config, standardise_images)
from ktnas.engine.runs import peak_memory
from ktnas.engine.supernet import count_parameters
from ktnas.engine.train import stem_of_store

from .report import Column, Report, rate

HELP = ("median search-step time, samples/s and peak memory: classic DARTS against KT-NAS (stem on the fly, "
        "cached features from disk or memory, fused kernels, CUDA graph)")
ALGOS = {"darts-1": ("darts", 1), "darts-2": ("darts", 2), "pcdarts": ("pcdarts", 1), "gdas": ("gdas", 1)}
SPACES = ("darts", "nb201")
CONFIGS = ("baseline", "stem-on-the-fly", "cached", "cached-fused", "cached-fused-graph")
CASES = ("baseline", "stem-on-the-fly", "cached", "cached-memory", "cached-fused", "cached-fused-graph")
CLASSIC_SIZE = 32  # the classic DARTS search runs on 32x32 images
FULL = dict(algos=tuple(ALGOS), spaces=SPACES, steps=20, warmup=5, batch_size=None)
QUICK = dict(algos=("darts-1", "darts-2"), spaces=("darts",), steps=3, warmup=1, batch_size=8)
GRAPH_WARMUP = 3  # eager steps on a side stream before the capture (lazy optimiser state, cuDNN, autotuning)
NEEDS_CUDA_FUSED = ("needs CUDA: the fused Triton kernels run on the CPU only under Triton's interpreter "
                    "(TRITON_INTERPRET=1), far too slow to time")
NEEDS_CUDA_GRAPH = "needs CUDA: the step is captured in a CUDA graph"
GDAS_GRAPH = ("GDAS draws its Gumbel sample on the host and computes one op per edge chosen there each step "
              "(data-dependent control flow): a CUDA graph cannot capture it")


class _Skip(Exception):
    """A configuration that cannot run here; its message is the row's reason."""


@dataclass(frozen=True)
class _Case:
    name: str       # --configs name
    config: str     # the row's config
    source: str     # images | disk | memory
    kernels: str    # torch | triton
    graph: bool = False


_CASES = {c.name: c for c in (
    _Case("baseline", "baseline", "images", "torch"),
    _Case("stem-on-the-fly", "stem-on-the-fly", "images", "torch"),
    _Case("cached", "cached", "disk", "torch"),
    _Case("cached-memory", "cached", "memory", "torch"),
    _Case("cached-fused", "cached-fused", "disk", "triton"),
    _Case("cached-fused-graph", "cached-fused-graph", "disk", "triton", graph=True))}


# ---------------------------------------------------------------------------------------------------- memory
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _trim_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next configuration's RSS starts low."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).malloc_trim(0)


class _Memory:
    """Peak memory of one configuration: CUDA's allocator peak, or the process's RSS high-water mark (reset per
    configuration where Linux allows it; else the process-wide peak, which only grows)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = device.type == "cuda" or self._reset_rss()
        self.kind = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                     "peak RSS of the process during the configuration" if self.resettable else
                     "peak RSS of the process so far (its high-water mark could not be reset)")

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            return _proc_status_kib("VmHWM") is not None
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _trim_host_memory()
            if self.resettable:
                self._reset_rss()
            self.base = (_proc_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int:
        hwm = _proc_status_kib("VmHWM") if self.device.type != "cuda" and self.resettable else None
        return hwm * 1024 if hwm is not None else peak_memory(self.device)


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class _Data:
    """What every configuration draws from: the store, the split, and the same samples as raw images."""

    store: str
    num_classes: int
    feat_shape: tuple[int, int, int]
    train: np.ndarray                 # sample indices of search-train
    val: np.ndarray                   # and of search-validation
    attrs: dict
    images: torch.Tensor | None       # raw uint8 [n, c, h, w] (None: not loadable, see images_missing)
    classic: torch.Tensor | None      # normalised float [n, 3, 32, 32]
    labels: torch.Tensor | None
    images_missing: str | None = None


def classic_images(images: torch.Tensor, size: int = CLASSIC_SIZE) -> torch.Tensor:
    """uint8 images [n, c, h, w] -> the classic search's input: float, 3 channels, ``size`` x ``size`` (smaller
    images zero-padded around the centre, e.g. Fashion-MNIST 28 -> 32; larger ones resized, bilinear with
    antialiasing), normalised by the per-channel mean and std of these images (as ``ktnas search --stem none``)."""
    x = images.float().div_(255)
    h, w = x.shape[-2:]
    if h > size or w > size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    elif (h, w) != (size, size):
        top, left = (size - h) // 2, (size - w) // 2
        x = F.pad(x, (left, size - w - left, top, size - h - top))
    return standardise_images(x).contiguous()


def _build_store(path: Path, n: int, build: dict, device) -> None:
    """Precompute the first ``n`` train samples into ``path`` (reused as it is when an earlier run made the same
    store; rebuilt when it was made with other arguments)."""
    cfg = PrecomputeConfig(out=str(path), splits=("train",), limit=n, device=str(device), progress=False,
                           resume=True, **build)
    print(f"ktnas bench search: feature store {path}: {build['dataset']} train[:{n}] through {build['stem']} "
          f"(weights {build['weights']}) at {build['image_size']} px ...", file=sys.stderr)
    try:
        precompute(cfg)
    except KtnasError as e:
        if "cannot resume" not in str(e):
            raise
        precompute(dataclasses.replace(cfg, resume=False, overwrite=True))


def _load_data(features, n_wanted: int, build: dict, work_dir: Path, device, seed: int, notes: list) -> _Data:
    if features is None:
        features = work_dir / "features.zarr"
        _build_store(features, n_wanted, build, device)
        notes.append(f"features: built here into {features} (reused by a rerun with the same arguments): "
                     f"{build['dataset']} train[:{n_wanted}] through {build['stem']} (weights {build['weights']}) "
                     f"at {build['image_size']} px")
    else:
        notes.append(f"features: {features}")
    features = str(features)
    with open_store(features) as st:
        sp = st.split("train")
        attrs = dict(st.attrs)
        n = min(n_wanted, sp.shape[0])
        store_labels = torch.from_numpy(np.asarray(sp.read_labels()[:n])).long()
        feat_shape = tuple(int(v) for v in sp.shape[2:])
        num_classes = int(attrs.get("num_classes") or int(store_labels.max()) + 1)
        notes.append(f"features: {list(feat_shape)} {sp.dtype} per sample, chunks of {sp.chunk_size}, "
                     f"{attrs.get('compressor', '?')}; stem {attrs.get('stem')} at "
                     f"{attrs.get('preprocessing', {}).get('image_size')} px, weights {attrs.get('weights')}")
    train, val = _split_indices(n, SearchConfig(seed=seed))
    images = classic = labels = None
    missing = None
    try:
        split = load_split(attrs["dataset"], "train", image_size=attrs.get("preprocessing", {}).get("image_size"),
                           seed=int(attrs.get("seed", 0)))
        if len(split) < n or not torch.equal(split.labels[:n].long(), store_labels):
            raise KtnasError(f"the images of {attrs['dataset']} here are not the ones the store was made from "
                             f"(their labels differ)")
        images, labels = split.get_batch(slice(0, n)), split.labels[:n].long().clone()
        classic = classic_images(images)
    except KtnasError as e:
        missing = f"the store's images cannot be loaded here: {e}"
    except KeyError:
        missing = "the store does not name its data set, so its images cannot be loaded"
    return _Data(features, num_classes, feat_shape, train, val, attrs, images, classic, labels, missing)


def _full_batches(loader, batch: int):
    """Endless full batches of ``loader`` (epoch after epoch; a short last batch is left out)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        got = False
        for x, y in loader:
            if len(y) == batch:
                got = True
                yield x, y
        if not got:
            raise KtnasError(f"no full batch of {batch} samples: pass --samples of at least {2 * batch}")
        epoch += 1


# ---------------------------------------------------------------------------------------------- one config
def _capture(run: _Run, step, example, device):
    """Capture ``step(xt, yt, xv, yv)`` (the whole search step: forward, backward, both optimisers) in one CUDA
    graph over static copies of ``example``'s tensors; returns ``replay(xt, yt, xv, yv)`` that copies a batch into
    those buffers, replays the graph and returns the captured (loss, logits)."""
    static = [t.clone() for t in example]
    for group in run.a_opt.param_groups:  # Adam's step counter on the device (set before its first step)
        group["capturable"] = True
    run.amp = dict(run.amp, cache_enabled=False)  # autocast's weight-cast cache is not capture-safe
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # lazy state (momentum buffers, Adam moments), cuDNN plans, Triton compiles
        for _ in range(GRAPH_WARMUP):
            step(*static)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the FeatureLoader's threads (pinned host buffers) may run while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = step(*static)
    torch.cuda.synchronize(device)

    def replay(xt, yt, xv, yv):
        for dst, src in zip(static, (xt, yt, xv, yv)):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return out
    return replay, graph


def _root_cause(e: BaseException) -> str:
    """``Type: first line`` of the exception that started ``e``'s chain (a failed capture raises again when it
    ends: the first error is the one that names the operation)."""
    seen = {id(e)}
    while e.__context__ is not None and id(e.__context__) not in seen:
        e = e.__context__
        seen.add(id(e))
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _store_stem(attrs: dict):
    """The frozen stem that made a store, rebuilt from its attributes and checked against its fingerprint
    (``ktnas train``'s own :func:`stem_of_store`); a _Skip when it cannot be rebuilt here."""
    try:
        return stem_of_store(attrs)
    except (KtnasError, KeyError) as e:
        raise _Skip(f"the store's stem cannot be rebuilt here: {e}") from None


def _inputs(case: _Case, data: _Data, run: _Run, batch: int, device, seed: int, stack: contextlib.ExitStack):
    """``fetch()`` -> (xt, yt, xv, yv) on ``device``, the network's inputs for this configuration."""
    if case.source == "images":
        if data.images is None:
            raise _Skip(data.images_missing)
        # in host memory, each batch copied to the device: as ktnas search --stem none (and train --on-the-fly)
        x = data.classic if case.config == "baseline" else data.images
        tr = _full_batches(ImageBatches(x, data.labels, data.train, batch, seed, device), batch)
        va = _full_batches(ImageBatches(x, data.labels, data.val, batch, seed + 1, device), batch)
        stack.callback(tr.close)
        stack.callback(va.close)
        if case.config == "baseline":
            return lambda: (*next(tr), *next(va))
        stem = _store_stem(data.attrs)
        if stem.fingerprint != data.attrs.get("stem_fingerprint"):
            raise _Skip(f"the stem rebuilt here ({stem.spec}, weights {stem.weights_source}) is not the one that "
                        f"made the store (another fingerprint)")
        stem = stem.to(device)
        if device.type == "cuda":
            stem = stem.to(memory_format=torch.channels_last)  # as precompute runs it

        def fetch():
            (it, yt), (iv, yv) = next(tr), next(va)
            with torch.autocast(**run.amp):
                ft, fv = stem(it), stem(iv)
            return ft.float(), yt, fv.float(), yv
        return fetch
    kw = dict(batch_size=batch, shuffle=True, device=device, seed=seed, drop_last=True,
              in_memory=case.source == "memory")
    loaders = [stack.enter_context(FeatureLoader(data.store, "train", indices=idx, **kw))
               for idx in (data.train, data.val)]
    tr, va = (_full_batches(ld, batch) for ld in loaders)
    stack.callback(tr.close)
    stack.callback(va.close)
    return lambda: (*next(tr), *next(va))


def _measure(case: _Case, data: _Data, cfg: SearchConfig, batch: int, device, steps: int, warmup: int,
             memory: _Memory) -> dict:
    """Build the configuration's run, time its steps; the measured fields of its row."""
    baseline = case.config == "baseline"
    C, H, W = (3, CLASSIC_SIZE, CLASSIC_SIZE) if baseline else data.feat_shape
    info = dict(in_channels=C, resolution=min(H, W), shape=[C, H, W], num_classes=data.num_classes)
    memory.start()
    with contextlib.ExitStack() as stack:
        _seed_all(cfg.seed)
        run = _Run(cfg, device, info)
        run.model.train()
        fetch = _inputs(case, data, run, batch, device, cfg.seed, stack)
        gen, rng = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
        epoch = cfg.warmup  # the architecture parameters train from this epoch on (PC-DARTS' warm-up)

        def step(xt, yt, xv, yv):
            return run.search_step(epoch, xt, yt, xv, yv, gen, rng)

        w0, a0 = _hash(run.model.weight_parameters()), _hash(run.model.arch_parameters())
        try:
            if case.graph:
                try:
                    step, _graph = _capture(run, step, fetch(), device)
                except (torch.cuda.OutOfMemoryError, KtnasError):  # out of memory; the kernels refusing a variant
                    raise
                except Exception as e:  # noqa: BLE001 - any capture failure becomes the row's reason
                    raise _Skip(f"CUDA graph capture failed: {_root_cause(e)}") from None
            times = []
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                loss, _ = step(*fetch())
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        except KtnasError as e:
            if case.kernels != "triton":
                raise
            raise _Skip(str(e)) from None  # the fused kernels refuse this variant / dtype
        peak = memory.peak()
        loss = float(loss)
        w1, a1 = _hash(run.model.weight_parameters()), _hash(run.model.arch_parameters())
        med = statistics.median(times)
        return dict(step_ms=1e3 * med, samples_per_s=batch / med, peak_mem_bytes=peak,
                    mem_increase_bytes=max(0, peak - memory.base), step_ms_all=[1e3 * t for t in times],
                    loss=loss, params_changed=w0 != w1, arch_changed=a0 != a1, **_network(run, info))


def _network(run: _Run, info: dict) -> dict:
    return dict(params=count_parameters(run.model), arch_params=sum(p.numel() for p in run.model.arch_parameters()),
                cells=run.layout["layers"], channels=run.layout["channels"], reductions=run.layout["reductions"],
                input_shape=list(info["shape"]))


def _cuda_reason(case: _Case, algo: str, device) -> str | None:
    """Why ``case`` cannot run for ``algo`` on ``device`` (None: it can)."""
    if case.kernels == "triton" and device.type != "cuda":
        return NEEDS_CUDA_GRAPH if case.graph else NEEDS_CUDA_FUSED
    if case.graph and algo == "gdas":
        return GDAS_GRAPH
    if case.kernels == "triton":
        from ktnas.kernels.mixed import resolve_impl

        try:
            resolve_impl("triton", device)
        except KtnasError as e:
            return str(e)
    return None


def _run_case(case: _Case, data: _Data, space: str, algo: str, order: int, batch: int, device, *, steps: int,
              warmup: int, precision: str, seed: int, memory: _Memory, memory_cap: int | None, broken: list) -> dict:
    row = dict(config=case.config, source=case.source, space=space, algo=algo, order=order, batch=batch,
               device=str(device), precision=precision, kernels=case.kernels, step_ms=None, samples_per_s=None,
               peak_mem_bytes=None, mem_increase_bytes=None, skipped=None, steps=steps, warmup=warmup)
    kw = (dict(stem="none", dataset=data.attrs.get("dataset", "?")) if case.config == "baseline"
          else dict(stem="features", features=data.store))
    cfg = resolve_config(SearchConfig(space=space, algo=algo, order=order, batch_size=batch, device=str(device),
                                      precision=precision, kernels=case.kernels, seed=seed, progress=False, **kw))
    reason = _cuda_reason(case, algo, device) or (broken[0] if broken and device.type == "cuda" else None)
    oom = False
    if reason is None:
        try:
            row.update(_measure(case, data, cfg, batch, device, steps, warmup, memory))
        except _Skip as e:
            reason = str(e)
        except torch.cuda.OutOfMemoryError:
            oom = True
    if oom:
        cap = f" under --memory-cap {memory_cap / 2**30:.2f} GiB" if memory_cap else ""
        reason = f"out of memory{cap} at batch {batch}"
        gc.collect()
        torch.cuda.empty_cache()
        if memory_cap and case.config in ("baseline", "cached", "cached-fused") and not case.graph:
            with contextlib.suppress(KtnasError):  # the largest batch whose eager step fits (the search's own picker)
                C, H, W = (3, CLASSIC_SIZE, CLASSIC_SIZE) if case.config == "baseline" else data.feat_shape
                info = dict(in_channels=C, resolution=min(H, W), shape=[C, H, W], num_classes=data.num_classes)
                row["fits_batch"] = choose_batch_size(dataclasses.replace(cfg, max_memory=memory_cap), device, info)
                reason += f"; batch {row['fits_batch']} fits"
    if reason is not None:
        row["skipped"] = reason
        if device.type == "cuda" and case.graph:  # a failed capture must not poison the later configurations
            try:
                torch.cuda.synchronize(device)
            except Exception as e:  # noqa: BLE001
                broken.append(f"the CUDA context failed after an earlier capture ({type(e).__name__})")
    gc.collect()
    if device.type == "cuda" and not broken:
        torch.cuda.empty_cache()
    return row


def _add_ratios(rows: list[dict]) -> None:
    """speedup and mem_ratio against the group's baseline; stream_overhead of disk over memory."""
    def key(r):
        return r["space"], r["algo"], r["order"], r["batch"]

    base = {key(r): r for r in rows if r["config"] == "baseline" and r["skipped"] is None}
    mem = {key(r): r for r in rows if r["config"] == "cached" and r["source"] == "memory" and r["skipped"] is None}
    field = "peak_mem_bytes" if rows and rows[0]["device"].startswith("cuda") else "mem_increase_bytes"
    for r in rows:
        b, m = base.get(key(r)), mem.get(key(r))
        ok = r["skipped"] is None
        r["speedup"] = r["samples_per_s"] / b["samples_per_s"] if ok and b else None
        r["mem_ratio"] = r[field] / b[field] if ok and b and b[field] else None
        r["stream_overhead"] = (r["step_ms"] / m["step_ms"] - 1 if ok and m and r["config"] == "cached"
                                and r["source"] == "disk" else None)


def _names(value, allowed, flag: str) -> tuple[str, ...]:
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise KtnasError(f"{'unknown ' + repr(bad[0]) if bad else 'nothing'} in {flag}: use a comma-separated "
                         f"subset of {','.join(allowed)}")
    return tuple(dict.fromkeys(items))


def _positive(name: str, v, low: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise KtnasError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}: pass a valid value")


def bench_search(features=None, *, samples: int | None = None, dataset: str = "fashion-mnist",
                 stem: str = DEFAULT_STEM, weights: str = "imagenet", image_size: int = DEFAULT_IMAGE_SIZE,
                 device: str = "auto", quick: bool = False, algos=None, spaces=None, configs=None,
                 steps: int | None = None, warmup: int | None = None, batch_size: int | None = None,
                 precision: str = "fp32", memory_cap=None, seed: int = 0, work_dir=None,
                 notes: list | None = None) -> list[dict]:
    """Rows ``{config, source, space, algo, order, batch, device, step_ms, samples_per_s, peak_mem_bytes,
    mem_increase_bytes, speedup, mem_ratio, stream_overhead, params, cells, loss, skipped, ...}``, one per
    configuration, space and algorithm (see the module docstring). ``features``: a store of stem features (None:
    build one into ``work_dir``/features.zarr from ``dataset``/``stem``/``weights``/``image_size``). ``quick``:
    the defaults of a run of a few minutes on a CPU (darts-1 and darts-2 on the DARTS space, batch 8, 1 + 3
    steps). Lines describing the run are appended to ``notes`` when given."""
    mode = QUICK if quick else FULL
    algos = _names(algos or mode["algos"], tuple(ALGOS), "--algos")
    spaces = _names(spaces or mode["spaces"], SPACES, "--spaces")
    cases = _names(configs or CASES, CASES, "--configs")
    steps = mode["steps"] if steps is None else steps
    warmup = mode["warmup"] if warmup is None else warmup
    batch_size = mode["batch_size"] if batch_size is None else batch_size
    _positive("steps", steps)
    _positive("warmup", warmup, 0)
    if batch_size is not None:
        _positive("batch_size", batch_size)
    if samples is not None:
        _positive("samples", samples, 2)
    if precision not in ("fp32", "bf16"):
        raise KtnasError(f"unknown --precision {precision!r}: use fp32 or bf16")
    dev = resolve_device(device)
    cap = None if memory_cap is None else parse_size(memory_cap)
    if cap is not None and dev.type != "cuda":
        raise KtnasError(f"--memory-cap limits CUDA memory: this run is on {dev}; drop --memory-cap or use "
                         f"--device cuda")
    notes = [] if notes is None else notes
    batches = {a: PAPER_DEFAULTS[ALGOS[a][0]]["batch_size"] if batch_size is None else batch_size for a in algos}
    need = 2 * (warmup + steps) * max(batches.values())  # distinct full batches for every step of each split
    work_dir = Path(work_dir or "runs/bench-search")
    work_dir.mkdir(parents=True, exist_ok=True)
    build = dict(dataset=dataset, stem=stem, weights=weights, image_size=image_size)
    if features is not None and not store_exists(features):
        raise KtnasError(f"no feature store at {features}: pass a store made by precompute-features, or drop "
                         f"--features to build one")
    data = _load_data(features, need if samples is None else samples, build, work_dir, dev, seed, notes)
    small = min(len(data.train), len(data.val))
    if small < max(batches.values()):
        raise KtnasError(f"{len(data.train) + len(data.val)} samples give {small} per split (search-train / "
                         f"validation), fewer than batch {max(batches.values())}: pass --samples of at least "
                         f"{2 * max(batches.values())}, or a smaller --batch-size")
    memory = _Memory(dev)
    notes.append(f"memory: {memory.kind}")
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    if cap is not None:
        if cap > total:
            raise KtnasError(f"--memory-cap {cap / 2**30:.2f} GiB exceeds the device's {total / 2**30:.2f} GiB: "
                             f"pass a smaller cap")
        torch.cuda.set_per_process_memory_fraction(cap / total, dev)
        notes.append(f"memory cap: {cap / 2**30:.2f} GiB of {total / 2**30:.2f} GiB "
                     f"(torch.cuda.set_per_process_memory_fraction)")
    rows, broken = [], []
    try:
        # one untimed step first, discarded: the process's one-time costs (code pages of the libraries, thread
        # pools, the CUDA context and its library handles) must not land on the first configuration
        prime = next((c for c in cases if _CASES[c].kernels == "torch"
                      and not (_CASES[c].source == "images" and data.images is None)), None)
        if prime is not None:
            algo, order = ALGOS[algos[0]]
            _run_case(_CASES[prime], data, spaces[0], algo, order, batches[algos[0]], dev, steps=1, warmup=0,
                      precision=precision, seed=seed, memory=memory, memory_cap=None, broken=broken)
        for space in spaces:
            for a in algos:
                algo, order = ALGOS[a]
                for name in cases:
                    case = _CASES[name]
                    print(f"ktnas bench search: {space} {a} batch {batches[a]}: {name} ...", file=sys.stderr)
                    rows.append(_run_case(case, data, space, algo, order, batches[a], dev, steps=steps,
                                          warmup=warmup, precision=precision, seed=seed, memory=memory,
                                          memory_cap=cap, broken=broken))
    finally:
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
    _add_ratios(rows)
    return rows


# ---------------------------------------------------------------------------------------------------- report
def _algo_label(r) -> str:
    return f"{r['algo']} ({'2nd' if r['order'] == 2 else '1st'} order)" if r["algo"] == "darts" else r["algo"]


def _mib(v) -> str:
    return f"{v / 2**20:,.0f}" if v is not None else "-"


def _mem_cell(r) -> str:
    if r["skipped"] is not None:
        return "-"
    return _mib(r["peak_mem_bytes"]) + ("" if r["device"].startswith("cuda") else
                                        f" (+{_mib(r['mem_increase_bytes'])})")


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _note(r) -> str:
    if r["skipped"] is not None:
        return "skipped: " + r["skipped"]
    parts = [f"loss {r['loss']:.3f}"]
    if r.get("stream_overhead") is not None:
        parts.append(f"streaming {100 * r['stream_overhead']:+.1f}% step time over memory")
    return ", ".join(parts)


COLUMNS = [Column("space", "space"), Column(None, "algo", _algo_label), Column("batch", "batch"),
           Column("config", "config"), Column("source", "input"),
           Column("step_ms", "step ms (median)", lambda v: "-" if v is None else f"{v:,.1f}"),
           Column("samples_per_s", "samples/s", lambda v: "-" if v is None else rate(v)),
           Column("speedup", "samples/s vs baseline", _x),
           Column(None, "peak mem MiB", _mem_cell), Column("mem_ratio", "mem vs baseline", _x),
           Column(None, "weights / cells", lambda r: "-" if r.get("params") is None
                  else f"{r['params']:,} / {r['cells']}"),
           Column(None, "note", _note)]

COLORS = {("baseline", "images"): "tab:gray", ("stem-on-the-fly", "images"): "tab:orange",
          ("cached", "disk"): "tab:blue", ("cached", "memory"): "tab:cyan", ("cached-fused", "disk"): "tab:green",
          ("cached-fused-graph", "disk"): "tab:red"}


def _kind_label(kind) -> str:
    return f"{kind[0]} ({kind[1]})" if kind[0] == "cached" else kind[0]


def _chart(axes, rows) -> None:
    """Left: samples/s; right: peak memory (CPU: the RSS increase); bars per configuration, grouped by (space,
    algorithm, batch); a skipped configuration is named at its place."""
    groups = list(dict.fromkeys((r["space"], _algo_label(r), r["batch"]) for r in rows))
    kinds = list(dict.fromkeys((r["config"], r["source"]) for r in rows))
    width = 0.8 / max(1, len(kinds))
    cpu = bool(rows) and not rows[0]["device"].startswith("cuda")
    for ax, key, ylabel in ((axes[0], "samples_per_s", "samples/s (median step)"),
                            (axes[1], "mem_increase_bytes" if cpu else "peak_mem_bytes",
                             "RSS increase MiB" if cpu else "peak memory MiB (max_memory_allocated)")):
        for k, kind in enumerate(kinds):
            xs, hs = [], []
            for g, grp in enumerate(groups):
                for r in rows:
                    if (r["space"], _algo_label(r), r["batch"]) == grp and (r["config"], r["source"]) == kind:
                        x = g + (k - (len(kinds) - 1) / 2) * width
                        if r["skipped"] is None:
                            xs.append(x)
                            hs.append(r[key] / (1 if key == "samples_per_s" else 2**20))
                        else:
                            ax.text(x, 0, f" {_kind_label(kind)}: skipped", rotation=90, ha="center", va="bottom",
                                    fontsize=6, color="0.35")
            if xs:
                ax.bar(xs, hs, width, color=COLORS.get(kind, "tab:purple"), label=_kind_label(kind))
        ax.set_xticks(range(len(groups)), [f"{s}\n{a}\nbatch {b}" for s, a, b in groups], fontsize=7)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="best")


def add_arguments(p) -> None:
    p.add_argument("--features", default=None, metavar="STORE",
                   help="a store of stem features (default: build one into --out from --dataset/--stem/...)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--quick", action="store_true",
                   help=f"a few minutes on a CPU: --algos {','.join(QUICK['algos'])} --spaces "
                        f"{','.join(QUICK['spaces'])} --batch-size {QUICK['batch_size']} --warmup {QUICK['warmup']} "
                        f"--steps {QUICK['steps']} unless given")
    p.add_argument("--algos", default=None,
                   help=f"comma-separated subset of {','.join(ALGOS)} (default: all; --quick: "
                        f"{','.join(QUICK['algos'])})")
    p.add_argument("--spaces", default=None, help="comma-separated subset of darts,nb201 (default: both; --quick: "
                                                  "darts)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated subset of {','.join(CASES)} (default: all; cached-memory is the 'cached' "
                        f"row with source memory)")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps; the median counts (default: "
                                                           f"{FULL['steps']}; --quick: {QUICK['steps']})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default: {FULL['warmup']}; "
                                                            f"--quick: {QUICK['warmup']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"one batch for every algorithm (default: the papers': darts 64, pcdarts 256, gdas 64; "
                        f"--quick: {QUICK['batch_size']})")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="autocast (default: fp32)")
    p.add_argument("--memory-cap", default=None, metavar="SIZE",
                   help="CUDA: cap the process's memory (set_per_process_memory_fraction), e.g. 2GiB; a configuration "
                        "that runs out is skipped, with the largest batch that fits")
    p.add_argument("--samples", type=int, default=None,
                   help="train samples used, split in half (default: enough for distinct batches every step)")
    p.add_argument("--seed", type=int, default=0, help="network initialisation and batch order (default: 0)")
    g = p.add_argument_group("building the store (without --features)")
    g.add_argument("--dataset", default="fashion-mnist", help="images (train split) (default: %(default)s)")
    g.add_argument("--stem", default=DEFAULT_STEM, help="ARCH:CUT (default: %(default)s)")
    g.add_argument("--weights", default="imagenet", help="imagenet | none | PATH (default: %(default)s)")
    g.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                   help="stem input size (default: %(default)s)")


def report(args, work_dir=None) -> Report:
    """Run :func:`bench_search` with the CLI's arguments."""
    notes: list[str] = []
    rows = bench_search(args.features, samples=args.samples, dataset=args.dataset, stem=args.stem,
                        weights=args.weights, image_size=args.image_size, device=args.device, quick=args.quick,
                        algos=args.algos, spaces=args.spaces, configs=args.configs, steps=args.steps,
                        warmup=args.warmup, batch_size=args.batch_size, precision=args.precision,
                        memory_cap=args.memory_cap, seed=args.seed, work_dir=work_dir, notes=notes)
    r0 = rows[0]
    notes += [f"each configuration: a freshly seeded network, {r0['warmup']} untimed step(s), then {r0['steps']} "
              "timed step(s) (the median counts); a step = fetching a training and a validation batch (+ the frozen "
              "stem for stem-on-the-fly) + ktnas search's own step (_Run.search_step), CUDA synchronised; "
              "configurations run one after the other, after one discarded step (one-time costs)",
              "baseline: --stem none, classic network on 32x32 images (host memory, copied per batch); "
              "stem-on-the-fly: the store's frozen stem on the raw images (host memory, copied per batch); cached "
              "(disk): FeatureLoader streaming the store (page cache warm); cached (memory): FeatureLoader "
              "in_memory=True (GPU memory on CUDA); fused: --kernels triton; graph: the whole step captured in one "
              "CUDA graph",
              "samples/s vs baseline and mem vs baseline: against the baseline of the same space, algorithm and "
              "batch; on the CPU peak mem is the process's RSS peak during the configuration, (+N) its increase "
              "over the RSS at its start, and mem vs baseline compares the increases",
              "streaming: step time of cached (disk) over cached (memory) - 1",
              "targets (H100, issue 5): cached-fused-graph against the baseline, DARTS 1st and 2nd order at batch "
              "64: samples/s vs baseline >= 10x and mem vs baseline <= 0.125x; streaming <= +10%"]
    return Report("search", "ktnas bench search: one search step, classic DARTS vs KT-NAS", rows, COLUMNS, _chart,
                  device=rows[0]["device"] if rows else "cpu", notes=notes, chart_panels=2)

