"""``ktnas bench search``: one search step of classic DARTS against KT-NAS, configuration by configuration.

In one process and one run, for every space and algorithm at the same batch size, it times ``ktnas search``'s own
step (``SearchRun.search_step``) of each configuration: ``baseline`` (classic DARTS, ``--stem none``, 32x32
images), ``stem-on-the-fly`` (the frozen stem on each batch of raw images), ``cached`` (cached features from disk;
``cached-memory``: held in device memory; ``cached-compiled``: ``--capture compile``, on request only),
``cached-fused`` (the fused Triton mixed ops, CUDA only) and
``cached-fused-graph`` (the whole step captured in one CUDA graph: ``ktnas search --capture graph``'s own
path, ``ktnas.engine.search.capture``). Every configuration gets a freshly seeded
network; ``warmup`` untimed steps, then ``steps`` timed ones (median ``step_ms``, ``samples_per_s``); memory on
CUDA by ``max_memory_allocated``, on the CPU by the resident set's increase over the configuration.
docs/benchmarks/search.md gives the details and the measured tables.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import resolve_device
from ktnas.cache.stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM
from ktnas.cache.store import store_exists
from ktnas.cache.stream import FeatureLoader
from ktnas.engine.algorithms import ALGORITHMS, algorithm_variants, resolve_variant
from ktnas.engine.search.capture import GRAPH_WARMUP
from ktnas.engine.data import ImageBatches
from ktnas.engine.distributed import tensor_hash
from ktnas.cache.flags import parse_size
from ktnas.engine.search.memory import choose_batch_size
from ktnas.engine.runs import seed_all
from ktnas.engine.search.loop import SearchConfig, resolve_config
from ktnas.engine.spaces import SPACES
from ktnas.engine.search.run import SearchRun
from ktnas.engine.search.supernet import RECOMPUTE, count_parameters
from ktnas.engine.train.loop import stem_of_store
from ktnas.kernels.errors import KernelError

from .report import names, positive
from .search_data import CLASSIC_SIZE, HostMemory, SearchData, full_batches, load_data

CONFIGS = ("baseline", "stem-on-the-fly", "cached", "cached-compiled", "cached-fused", "cached-fused-graph")
CASES = ("baseline", "stem-on-the-fly", "cached", "cached-memory", "cached-compiled", "cached-fused",
         "cached-fused-graph")
DEFAULT_CASES = tuple(c for c in CASES if c != "cached-compiled")  # compiling (minutes on a CPU): on request
FULL = dict(algos=None, spaces=None, steps=20, warmup=5, batch_size=None)
QUICK = dict(algos=("darts-1", "darts-2"), spaces=("darts",), steps=3, warmup=1, batch_size=8)
NEEDS_CUDA_FUSED = ("needs CUDA: the fused Triton kernels run on the CPU only under Triton's interpreter "
                    "(TRITON_INTERPRET=1), far too slow to time")
NEEDS_CUDA_GRAPH = "needs CUDA: the step is captured in a CUDA graph"


class _Skip(Exception):
    """A configuration that cannot run here; its message is the row's reason."""


@dataclass(frozen=True)
class _Case:
    name: str       # --configs name
    config: str     # the row's config
    source: str     # images | disk | memory
    kernels: str    # torch | triton
    capture: str = "none"  # ktnas search --capture

    @property
    def graph(self) -> bool:
        return self.capture == "graph"


_CASES = {c.name: c for c in (
    _Case("baseline", "baseline", "images", "torch"),
    _Case("stem-on-the-fly", "stem-on-the-fly", "images", "torch"),
    _Case("cached", "cached", "disk", "torch"),
    _Case("cached-memory", "cached", "memory", "torch"),
    _Case("cached-compiled", "cached-compiled", "disk", "torch", capture="compile"),
    _Case("cached-fused", "cached-fused", "disk", "triton"),
    _Case("cached-fused-graph", "cached-fused-graph", "disk", "triton", capture="graph"))}


# ---------------------------------------------------------------------------------------------- one config
def _store_stem(attrs: dict):
    """The frozen stem that made a store, rebuilt from its attributes and checked against its fingerprint
    (``ktnas train``'s own :func:`stem_of_store`); a _Skip when it cannot be rebuilt here."""
    try:
        return stem_of_store(attrs)
    except (KtnasError, KeyError) as e:
        raise _Skip(f"the store's stem cannot be rebuilt here: {e}") from None


def _inputs(case: _Case, data: SearchData, run: SearchRun, batch: int, device, seed: int, stack: contextlib.ExitStack):
    """``fetch()`` -> (xt, yt, xv, yv) on ``device``, the network's inputs for this configuration."""
    if case.source == "images":
        if data.images is None:
            raise _Skip(data.images_missing)
        # in host memory, each batch copied to the device: as ktnas search --stem none (and train --on-the-fly)
        x = data.classic if case.config == "baseline" else data.images
        tr = full_batches(ImageBatches.of_tensors(x, data.labels, data.train, batch, seed, device), batch)
        va = full_batches(ImageBatches.of_tensors(x, data.labels, data.val, batch, seed + 1, device), batch)
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
    tr, va = (full_batches(ld, batch) for ld in loaders)
    stack.callback(tr.close)
    stack.callback(va.close)
    return lambda: (*next(tr), *next(va))


def _measure(case: _Case, data: SearchData, cfg: SearchConfig, batch: int, device, steps: int, warmup: int,
             memory: HostMemory) -> dict:
    """Build the configuration's run, time its steps; the measured fields of its row."""
    baseline = case.config == "baseline"
    C, H, W = (3, CLASSIC_SIZE, CLASSIC_SIZE) if baseline else data.feat_shape
    info = dict(in_channels=C, resolution=min(H, W), shape=[C, H, W], num_classes=data.num_classes)
    memory.start()
    with contextlib.ExitStack() as stack:
        seed_all(cfg.seed)
        run = SearchRun(cfg, device, info)
        run.model.train()
        fetch = _inputs(case, data, run, batch, device, cfg.seed, stack)
        gen, rng = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
        epoch = run.arch_start  # the architecture parameters train from this epoch on (PC-DARTS' warm-up)
        # ktnas search's own step as --capture runs it: graph rows capture after GRAPH_WARMUP eager steps
        step = stack.enter_context(run.stepper(epoch, gen, rng))
        w0, a0 = tensor_hash(run.model.weight_parameters()), tensor_hash(run.model.arch_parameters())
        try:
            times = []
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                loss, _ = step(*fetch())
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        except (KtnasError, KernelError) as e:
            if case.kernels != "triton":
                raise
            raise _Skip(str(e)) from None  # the fused kernels refuse this variant / dtype
        peak = memory.peak()
        loss = float(loss)
        w1, a1 = tensor_hash(run.model.weight_parameters()), tensor_hash(run.model.arch_parameters())
        med = statistics.median(times)
        return dict(step_ms=1e3 * med, samples_per_s=batch / med, peak_mem_bytes=peak,
                    mem_increase_bytes=max(0, peak - memory.base), step_ms_all=[1e3 * t for t in times],
                    loss=loss, params_changed=w0 != w1, arch_changed=a0 != a1, **_network(run, info))


def _network(run: SearchRun, info: dict) -> dict:
    return dict(params=count_parameters(run.model), arch_params=sum(p.numel() for p in run.model.arch_parameters()),
                cells=run.layout["layers"], channels=run.layout["channels"], reductions=run.layout["reductions"],
                input_shape=list(info["shape"]))


def _cuda_reason(case: _Case, algo: str, device) -> str | None:
    """Why ``case`` cannot run for ``algo`` on ``device`` (None: it can)."""
    if case.kernels == "triton" and device.type != "cuda":
        return NEEDS_CUDA_GRAPH if case.graph else NEEDS_CUDA_FUSED
    if case.kernels == "triton":
        from ktnas.kernels.mixed import resolve_impl

        try:
            resolve_impl("triton", device)
        except KernelError as e:
            return str(e)
    return None


def _run_case(case: _Case, data: SearchData, space: str, variant: str, batch: int, device, *, steps: int,
              warmup: int, precision: str, seed: int, memory: HostMemory, memory_cap: int | None, broken: list,
              recompute: str | None = None, compile_backend: str = "inductor") -> dict:
    algo, options = resolve_variant(variant)
    row = dict(config=case.config, source=case.source, space=space, variant=variant, algo=algo, options=options,
               batch=batch,
               device=str(device), precision=precision, kernels=case.kernels, step_ms=None, samples_per_s=None,
               peak_mem_bytes=None, mem_increase_bytes=None, skipped=None, steps=steps, warmup=warmup)
    kw = (dict(stem="none", dataset=data.attrs.get("dataset", "?")) if case.config == "baseline"
          else dict(stem="features", features=data.store, recompute=recompute or "auto"))
    cfg = resolve_config(SearchConfig(space=space, algo=algo, options=options, batch_size=batch, device=str(device),
                                      precision=precision, kernels=case.kernels, seed=seed, progress=False,
                                      capture=case.capture, compile_backend=compile_backend, **kw))
    row["recompute"], row["capture"] = cfg.recompute, cfg.capture
    if case.graph:  # the eager steps before the capture, and the capture, are not timed
        warmup = row["warmup"] = max(warmup, GRAPH_WARMUP + 1)
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
                row["fits_batch"] = choose_batch_size(dataclasses.replace(cfg, max_memory=memory_cap), device,
                                                     info).batch
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
        return r["space"], r["variant"], r["batch"]

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


def _check_args(steps, warmup, batch_size, samples, precision, device, memory_cap):
    """The arguments checked (one-line KtnasError); (device, memory cap in bytes or None)."""
    positive("steps", steps)
    positive("warmup", warmup, 0)
    if batch_size is not None:
        positive("batch_size", batch_size)
    if samples is not None:
        positive("samples", samples, 2)
    if precision not in ("fp32", "bf16"):
        raise KtnasError(f"unknown --precision {precision!r}: use fp32 or bf16")
    dev = resolve_device(device)
    cap = None if memory_cap is None else parse_size(memory_cap)
    if cap is not None and dev.type != "cuda":
        raise KtnasError(f"--memory-cap limits CUDA memory: this run is on {dev}; drop --memory-cap or use "
                         f"--device cuda")
    return dev, cap


def _apply_cap(cap, dev, notes: list) -> None:
    """``--memory-cap``: limit the process's CUDA memory to ``cap`` bytes (noted)."""
    if cap is None:
        return
    total = torch.cuda.get_device_properties(dev).total_memory
    if cap > total:
        raise KtnasError(f"--memory-cap {cap / 2**30:.2f} GiB exceeds the device's {total / 2**30:.2f} GiB: "
                         f"pass a smaller cap")
    torch.cuda.set_per_process_memory_fraction(cap / total, dev)
    notes.append(f"memory cap: {cap / 2**30:.2f} GiB of {total / 2**30:.2f} GiB "
                 f"(torch.cuda.set_per_process_memory_fraction)")


def _run_all(cases, data, spaces, algos, batches, dev, steps, warmup, precision, seed, memory, cap,
             recompute=None, compile_backend="inductor") -> list[dict]:
    """Every configuration of every space and algorithm, after one untimed priming step."""
    rows, broken = [], []
    # one untimed step first, discarded: the process's one-time costs (code pages of the libraries, thread
    # pools, the CUDA context and its library handles) must not land on the first configuration
    prime = next((c for c in cases if _CASES[c].kernels == "torch"
                  and not (_CASES[c].source == "images" and data.images is None)), None)
    if prime is not None:
        _run_case(_CASES[prime], data, spaces[0], algos[0], batches[algos[0]], dev, steps=1, warmup=0,
                  precision=precision, seed=seed, memory=memory, memory_cap=None, broken=broken)
    for space in spaces:
        for a in algos:
            for name in cases:
                case = _CASES[name]
                print(f"ktnas bench search: {space} {a} batch {batches[a]}: {name} ...", file=sys.stderr)
                rows.append(_run_case(case, data, space, a, batches[a], dev, steps=steps,
                                      warmup=warmup, precision=precision, seed=seed, memory=memory,
                                      memory_cap=cap, broken=broken, recompute=recompute,
                                      compile_backend=compile_backend))
    return rows


def bench_search(features=None, *, samples: int | None = None, dataset: str = "fashion-mnist",
                 stem: str = DEFAULT_STEM, weights: str = "imagenet", image_size: int = DEFAULT_IMAGE_SIZE,
                 device: str = "auto", quick: bool = False, algos=None, spaces=None, configs=None,
                 steps: int | None = None, warmup: int | None = None, batch_size: int | None = None,
                 precision: str = "fp32", memory_cap=None, seed: int = 0, work_dir=None,
                 notes: list | None = None, recompute: str | None = None,
                 compile_backend: str = "inductor") -> list[dict]:
    """Rows ``{config, source, space, variant, algo, options, batch, device, step_ms, samples_per_s, peak_mem_bytes,
    mem_increase_bytes, speedup, mem_ratio, stream_overhead, params, cells, loss, skipped, ...}``, one per
    configuration, space and algorithm (see the module docstring). ``features``: a store of stem features (None:
    build one into ``work_dir``/features.zarr from ``dataset``/``stem``/``weights``/``image_size``). ``quick``:
    the defaults of a run of a few minutes on a CPU (darts-1 and darts-2 on the DARTS space, batch 8, 1 + 3
    steps). Lines describing the run are appended to ``notes`` when given."""
    mode = QUICK if quick else FULL
    variants = tuple(algorithm_variants())
    algos = names(algos or mode["algos"] or variants, variants, "--algos")
    spaces = names(spaces or mode["spaces"] or tuple(SPACES), tuple(SPACES), "--spaces")
    cases = names(configs or DEFAULT_CASES, CASES, "--configs")
    if recompute is not None and recompute not in RECOMPUTE:
        raise KtnasError(f"unknown --recompute {recompute!r}: use one of {', '.join(RECOMPUTE)}")
    steps = mode["steps"] if steps is None else steps
    warmup = mode["warmup"] if warmup is None else warmup
    batch_size = mode["batch_size"] if batch_size is None else batch_size
    dev, cap = _check_args(steps, warmup, batch_size, samples, precision, device, memory_cap)
    notes = [] if notes is None else notes
    batches = {a: ALGORITHMS[resolve_variant(a)[0]].defaults["batch_size"] if batch_size is None else batch_size
               for a in algos}
    need = 2 * (warmup + steps) * max(batches.values())  # distinct full batches for every step of each split
    work_dir = Path(work_dir or "runs/bench-search")
    work_dir.mkdir(parents=True, exist_ok=True)
    build = dict(dataset=dataset, stem=stem, weights=weights, image_size=image_size)
    if features is not None and not store_exists(features):
        raise KtnasError(f"no feature store at {features}: pass a store made by precompute-features, or drop "
                         f"--features to build one")
    data = load_data(features, need if samples is None else samples, build, work_dir, dev, seed, notes)
    small = min(len(data.train), len(data.val))
    if small < max(batches.values()):
        raise KtnasError(f"{len(data.train) + len(data.val)} samples give {small} per split (search-train / "
                         f"validation), fewer than batch {max(batches.values())}: pass --samples of at least "
                         f"{2 * max(batches.values())}, or a smaller --batch-size")
    memory = HostMemory(dev)
    notes.append(f"memory: {memory.kind}")
    _apply_cap(cap, dev, notes)
    try:
        rows = _run_all(cases, data, spaces, algos, batches, dev, steps, warmup, precision, seed, memory, cap,
                        recompute, compile_backend)
    finally:
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
    _add_ratios(rows)
    return rows


