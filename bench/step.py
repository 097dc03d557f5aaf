"""``ktnas bench step``: what one search step costs on a GPU, read off this machine (no GPU needed).

For each configuration of ``ktnas bench search`` (``baseline``: classic DARTS, ``--stem none``, 32 px images;
``stem-on-the-fly``: the frozen stem on each batch of raw images, then the KT-NAS supernet; ``cached``: the
supernet on cached features, reference ops; ``cached-fused``: the same with the fused Triton mixed ops), plus
``cached-darts-edges`` (``cached`` with every edge computed as DARTS' own ``MixedOp``: a ReLU per conv op, 'none'
a zero tensor; DARTS' own code with its first cells replaced by the cached input, what the KT-NAS anchor measured
on the H100), algorithm (DARTS first and second order, PC-DARTS, GDAS) and space (DARTS, NAS-Bench-201), it runs
``ktnas search``'s own step
(``SearchRun.search_step``) once under the instruments of :mod:`ktnas.engine.profile.instruments`, by default on fake
tensors (``FakeTensorMode``: shapes and dtypes without data, so the papers' batch 64 costs no memory and little time; a
step at a small batch gives the same figures on real tensors, which the tests check). The step finds what a step
finds after the first: the optimiser state (momentum and Adam buffers) and the previous step's gradients.

Per row:
- memory (exact, as CUDA's allocator books it: requests rounded up to 512 B): weights, gradients, optimiser state,
  inputs, the bytes saved for backward (the largest of the step's forward passes, parameters excluded) and the
  peak of live tensor bytes during the step, which is what ``torch.cuda.max_memory_allocated`` reports. Not seen:
  cuDNN/cuBLAS workspaces, the CUDA context.
- device work (exact counts): kernel launches a CUDA step issues (ATen operations that launch a kernel; the
  optimisers and gradient clipping with CUDA's ``foreach`` defaults, a multi-tensor operation counted as the
  launches of CUDA's multi-tensor apply; the fused op's Triton launches counted by the op), host syncs (``.item()``),
  FLOPs (``torch.utils.flop_counter``: convolutions and matrix products; the fused op's elementwise arithmetic,
  from its registered FLOP formula, apart in ``fused_op_flops``) and the bytes every launch reads and
  writes (eager traffic; the fused op's kernels counted as they touch their tensors).
- estimates: the step-time floor on a GPU (roofline: FLOPs at the GPU's dense rate for the precision -- TF32 tensor
  cores for float32 convolutions, PyTorch's cuDNN default -- or bytes at its bandwidth, whichever is slower) and the
  launch-bound time (launches x a per-launch cost calibrated on DARTS' own code, :data:`LAUNCH_US`); the predicted
  step time is the larger of the two.

``--precision bf16`` applies CUDA's autocast cast policy
(:class:`~ktnas.engine.profile.instruments.CudaAutocast`), not the CPU's, whatever the machine.
"""
from __future__ import annotations

import sys
import time
import warnings

from ktnas.cache.errors import KtnasError
from ktnas.cache.stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM, get_stem
from ktnas.engine.algorithms import ALGORITHMS, algorithm_variants, resolve_variant
from ktnas.engine.spaces import SPACES
from ktnas.engine.search.loop import SearchConfig, default_recompute, resolve_config
from ktnas.engine.profile.step import launches_of, profile_search_step
from ktnas.engine.search.supernet import count_parameters
from ktnas.kernels.errors import KernelError

from .report import Column, Report, names
from .search_data import CLASSIC_SIZE

HELP = ("what one search step costs on a GPU, from any machine: peak memory, kernel launches, FLOPs, bytes moved "
        "and predicted step time, classic DARTS vs KT-NAS (reference and fused ops)")
CONFIGS = ("baseline", "stem-on-the-fly", "cached", "cached-darts-edges", "cached-fused")
AS_AUTHORS = ("baseline", "cached-darts-edges")  # DARTS' own computation: nothing recomputed
FULL = dict(algos=None, spaces=None, batch_size=None)  # None: every registered variant and space
QUICK = dict(algos=("darts-1",), spaces=("darts",), batch_size=4)
# GPUs: memory bandwidth (bytes/s) and dense peak FLOP/s (SXM parts, NVIDIA's data sheets)
GPUS = {"H100": dict(bandwidth=3.35e12, tf32=494.7e12, bf16=989.4e12, fp32=66.9e12),
        "H200": dict(bandwidth=4.8e12, tf32=494.7e12, bf16=989.4e12, fp32=66.9e12)}
# DARTS' own code (quark0/darts cnn/, fetched and run beside ktnas under these instruments, 2026-12-03, its
# `.cuda()` calls patched out, optimisers and clipping with CUDA's foreach defaults; first order, batch 64, fake
# tensors): 1,930,618 weights, 15.18 GFLOP per sample, 28,767 kernel launches, 8,034,593,024 bytes saved for
# backward by one forward, peak 7,701 MiB (the H100 measured 7,766 MiB: -0.8%); second order peak 9,998 MiB (the
# H100: 8,910 MiB, +12.2%). It takes about 784 ms a first-order step on an H100
# (../shared/notes/gpu-figures-on-a-cpu.md), hence the per-launch cost of an eager step: 784 ms / 28,767.
DARTS_OWN = dict(step_ms=784.0, launches=28_767, saved_bytes=8_034_593_024, peak_mib=7_701, peak_mib_order2=9_998,
                 gpu="H100")
LAUNCH_US = 1e3 * DARTS_OWN["step_ms"] / DARTS_OWN["launches"]
# H100 anchors of max_memory_allocated (MiB), batch 64 (the note above): what the fp32 rows are checked against
# (the KT-NAS ones measured DARTS' own code with its first cells replaced by the cached input: the computation of
# the cached-darts-edges configuration; ktnas's own edges share one ReLU and skip 'none', and keep less)
ANCHORS = {("baseline", "darts", "darts-1", "fp32"): 7766, ("cached-darts-edges", "darts", "darts-1", "fp32"): 3270,
           ("baseline", "darts", "darts-2", "fp32"): 8910, ("cached-darts-edges", "darts", "darts-1", "bf16"): 1812}


# ------------------------------------------------------------------------------------------------ one step
def _stem(spec: str, image_size: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the profile needs the shapes, not the transfer
        return get_stem(spec, weights="none", image_size=image_size)


def _profile_config(config, space, variant, batch, precision, seed, stem, image_size, num_classes, layers,
                    channels, recompute=None):
    """(resolved SearchConfig, data info, frozen stem or None, the step's input shape) of a configuration."""
    if config not in CONFIGS:
        raise KtnasError(f"unknown configuration {config!r}: use one of {', '.join(CONFIGS)}")
    if precision not in ("fp32", "bf16"):
        raise KtnasError(f"unknown --precision {precision!r}: use fp32 or bf16")
    baseline = config == "baseline"
    frozen = None if baseline else _stem(stem, image_size)
    feat = (3, CLASSIC_SIZE, CLASSIC_SIZE) if baseline else tuple(frozen.output_shape)
    info = dict(in_channels=feat[0], resolution=min(feat[1:]), shape=list(feat), num_classes=num_classes)
    kw = dict(stem="none", dataset="profile") if baseline else dict(stem="features", features="profile")
    algo, options = resolve_variant(variant)
    cfg = resolve_config(SearchConfig(space=space, algo=algo, options=options, batch_size=batch, device="cpu",
                                      kernels="triton" if config == "cached-fused" else "torch", seed=seed,
                                      progress=False, layers=layers, channels=channels,
                                      recompute="none" if config in AS_AUTHORS
                                      else recompute or default_recompute("features", "cuda"),  # CUDA's default
                                      **kw))
    return cfg, info, frozen, feat


def profile_step(config: str = "cached", space: str = "darts", variant: str = "darts-1",
                 batch: int = 64, *, precision: str = "fp32", fake: bool = True, seed: int = 0,
                 stem: str = DEFAULT_STEM, image_size: int = DEFAULT_IMAGE_SIZE, raw_shape=(1, 28, 28),
                 num_classes: int = 10, layers: int | None = None, channels: int | None = None,
                 darts_edges: bool | None = None, recompute: str | None = None) -> dict:
    """Profile one ``SearchRun.search_step`` of ``config`` (see the module docstring) for the algorithm
    ``variant`` (a label of ``ktnas.engine.algorithms.algorithm_variants``, or an algorithm's name) at ``batch``;
    a row dict.

    ``fake``: on fake tensors (nothing computed; False: on real CPU tensors, to check the instruments). ``stem`` /
    ``image_size`` / ``raw_shape``: the frozen stem whose features the KT-NAS configurations take, and the raw
    images it gets (default: Fashion-MNIST's 1x28x28 through ``mobilenet_v2:features.3`` at 64 px). ``layers`` /
    ``channels``: override the layout (tests use tiny networks). ``darts_edges``: compute every edge as DARTS' own
    ``MixedOp`` (a ReLU per conv op, 'none' a zero tensor; see ``MixedEdge``); default: as the configuration does
    (the baseline does, KT-NAS does not); True on KT-NAS: DARTS' own code on the cached input (the H100 anchor).
    ``recompute``: ``ktnas search --recompute`` of the KT-NAS configurations (default: search's, edge); the
    baseline and cached-darts-edges compute as DARTS' own code, recomputing nothing."""
    cfg, info, frozen, feat = _profile_config(config, space, variant, batch, precision, seed, stem, image_size,
                                              num_classes, layers, channels, recompute)
    baseline, fused = config == "baseline", config == "cached-fused"
    darts_edges = True if config == "cached-darts-edges" else darts_edges
    t0 = time.perf_counter()
    prof = profile_search_step(cfg, info, batch, fake=fake, seed=seed, precision=precision, darts_edges=darts_edges,
                               frozen=frozen if config == "stem-on-the-fly" else None, raw_shape=raw_shape)
    tracker, run, saved, sizes, triton_counts = (prof[k] for k in ("tracker", "run", "saved", "sizes",
                                                                  "triton_counts"))
    base = prof["start_bytes"]
    fused_flops = sum(v for op, v in tracker.flops.items() if "ktnas" in op)  # the fused op's own formula
    triton_launches = sum(v["launches"] for v in triton_counts.values())
    triton_bytes = sum(v["bytes"] for v in triton_counts.values())
    row = dict(config=config, space=space, variant=variant, algo=cfg.algo, options=cfg.options, batch=batch,
               precision=precision,
               recompute=cfg.recompute,
               kernels="triton" if fused else "torch", fake=fake,
               darts_edges=baseline if darts_edges is None else darts_edges, params=count_parameters(run.model),
               cells=run.layout["layers"], channels=run.layout["channels"], input_shape=list(feat), **sizes,
               saved_bytes=max((s["bytes"] for s in saved), default=0), forwards=len(saved),
               start_bytes=base, peak_bytes=tracker.peak, aten_launches=tracker.launches,
               triton_launches=triton_launches, launches=launches_of(tracker, triton_counts), syncs=tracker.syncs,
               flops=sum(tracker.flops.values()) - fused_flops, fused_op_flops=fused_flops,
               bytes_moved=tracker.bytes_moved + triton_bytes,
               top_ops=dict(tracker.ops.most_common(8)), profile_s=time.perf_counter() - t0)
    row.update(predict(row))
    return row


def predict(row: dict, gpu: str = "H100") -> dict:
    """Estimates from a row's counts: the roofline floor, the launch-bound time, the predicted step time (ms)."""
    spec = GPUS[gpu]
    rate = spec["bf16"] if row["precision"] == "bf16" else spec["tf32"]
    compute_ms = 1e3 * row["flops"] / rate  # convolutions and matrix products, on the tensor cores
    compute_ms += 1e3 * row.get("fused_op_flops", 0) / spec["fp32"]  # the fused op's float32 arithmetic
    memory_ms = 1e3 * row["bytes_moved"] / spec["bandwidth"]
    floor = max(compute_ms, memory_ms)
    launch_ms = row["launches"] * LAUNCH_US / 1e3
    return dict(gpu=gpu, floor_ms=floor, compute_ms=compute_ms, memory_ms=memory_ms, launch_ms=launch_ms,
                predicted_ms=max(floor, launch_ms), launch_us=LAUNCH_US)


# ---------------------------------------------------------------------------------------------- all rows
def bench_step(*, quick: bool = False, algos=None, spaces=None, configs=None, batch_size: int | None = None,
               precision: str = "fp32", fake: bool = True, seed: int = 0, stem: str = DEFAULT_STEM,
               image_size: int = DEFAULT_IMAGE_SIZE, gpu: str = "H100", notes: list | None = None,
               recompute: str | None = None) -> list[dict]:
    """Rows of :func:`profile_step` for every (space, algorithm, configuration); ratios against the baseline of
    the same space, algorithm and batch. A configuration that cannot be profiled here is a row with its reason."""

    mode = QUICK if quick else FULL
    variants = tuple(algorithm_variants())
    algos = names(algos or mode["algos"] or variants, variants, "--algos")
    spaces = names(spaces or mode["spaces"] or tuple(SPACES), tuple(SPACES), "--spaces")
    configs = names(configs or CONFIGS, CONFIGS, "--configs")
    batch_size = mode["batch_size"] if batch_size is None else batch_size
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise KtnasError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if gpu not in GPUS:
        raise KtnasError(f"unknown --gpu {gpu!r}: use one of {', '.join(GPUS)}")
    rows = []
    for space in spaces:
        for a in algos:
            batch = batch_size or ALGORITHMS[resolve_variant(a)[0]].defaults["batch_size"]
            for config in configs:
                print(f"ktnas bench step: {space} {a} batch {batch}: {config} ...", file=sys.stderr)
                head = dict(config=config, space=space, variant=a, algo=resolve_variant(a)[0], batch=batch,
                            precision=precision)
                try:
                    r = profile_step(config, space, a, batch, precision=precision, fake=fake, seed=seed,
                                     stem=stem, image_size=image_size, recompute=recompute)
                    r.update(predict(r, gpu))
                    r["skipped"] = None
                except (KtnasError, KernelError, NotImplementedError, RuntimeError) as e:
                    r = dict(head, skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                rows.append(r)
    _add_ratios(rows)
    if notes is not None:
        notes += _notes(gpu, fake)
    return rows


def _add_ratios(rows) -> None:
    def key(r):
        return r["space"], r["variant"], r["batch"], r["precision"]

    base = {key(r): r for r in rows if r["config"] == "baseline" and r.get("skipped") is None}
    for r in rows:
        b = base.get(key(r))
        ok = b is not None and r.get("skipped") is None
        r["mem_ratio"] = r["peak_bytes"] / b["peak_bytes"] if ok else None
        r["launch_ratio"] = r["launches"] / b["launches"] if ok else None
        r["speedup_predicted"] = b["predicted_ms"] / r["predicted_ms"] if ok else None
        anchor = ANCHORS.get((r["config"], r["space"], r["variant"], r["precision"]))
        if anchor is not None and r.get("skipped") is None and r["batch"] == 64:
            r["anchor_mib"] = anchor
            r["anchor_diff"] = r["peak_bytes"] / 2**20 / anchor - 1


def _notes(gpu: str, fake: bool) -> list[str]:
    spec = GPUS[gpu]
    return [
        f"{'fake tensors (FakeTensorMode): nothing computed' if fake else 'real CPU tensors'}; one step per row, "
        "with the optimiser state and gradients a step finds after the first (zeros of their shapes)",
        "exact: bytes (weights, grads, optimiser state, saved for backward, peak of live tensors as CUDA's allocator "
        "books them, 512 B rounding), kernel launches (ATen kernels with CUDA's foreach defaults + the fused op's "
        "Triton launches), syncs, FLOPs (convolutions and matrix products), bytes moved (eager traffic)",
        f"estimates: floor = max(FLOPs / {spec['tf32'] / 1e12:.0f} TFLOP/s TF32 (fp32) or "
        f"{spec['bf16'] / 1e12:.0f} TFLOP/s bf16, bytes moved / {spec['bandwidth'] / 1e12:.2f} TB/s) on the "
        f"{gpu}; launch-bound = launches x {LAUNCH_US:.1f} us (DARTS' own code: {DARTS_OWN['step_ms']:.0f} ms a "
        f"first-order step at batch 64 on an {DARTS_OWN['gpu']} / {DARTS_OWN['launches']:,} launches counted by this "
        f"profile); predicted = the larger; a step captured in a CUDA graph pays one launch, leaving the floor",
        "not seen: cuDNN/cuBLAS workspaces, the CUDA context, allocator fragmentation (memory_reserved)",
        "anchors (H100 max_memory_allocated, batch 64): classic DARTS 1st order 7,766 MiB, 2nd order 8,910 MiB; "
        "DARTS' own code on the KT-NAS layout (cached-darts-edges) 3,270 MiB fp32, 1,812 MiB bf16 autocast",
    ]


# ---------------------------------------------------------------------------------------------------- report
def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _anchor(r) -> str:
    if r.get("anchor_mib") is None:
        return ""
    return f"{r['anchor_mib']:,} MiB on the H100 ({100 * r['anchor_diff']:+.1f}%)"


def _cell(key, fmt):
    return lambda r: "-" if r.get("skipped") is not None else fmt(r[key])


COLUMNS = [Column("space", "space"), Column("variant", "algo"), Column("batch", "batch"),
           Column("config", "config"), Column("precision", "precision"), Column("recompute", "recompute"),
           Column(None, "peak MiB (exact)", _cell("peak_bytes", _mib)),
           Column(None, "saved for bwd MiB (exact)", _cell("saved_bytes", _mib)),
           Column(None, "mem vs baseline", lambda r: _x(r.get("mem_ratio"))),
           Column(None, "launches (exact)", lambda r: "-" if r.get("skipped") is not None else
                  f"{r['aten_launches']:,}" + (f" + {r['triton_launches']:,} Triton" if r["triton_launches"] else "")),
           Column(None, "launches vs baseline", lambda r: _x(r.get("launch_ratio"))),
           Column(None, "GFLOP (exact)", _cell("flops", lambda v: f"{v / 1e9:,.0f}")),
           Column(None, "GiB moved (exact)", _cell("bytes_moved", lambda v: f"{v / 2**30:,.1f}")),
           Column(None, "floor ms (est.)", _cell("floor_ms", lambda v: f"{v:,.1f}")),
           Column(None, "launch-bound ms (est.)", _cell("launch_ms", lambda v: f"{v:,.0f}")),
           Column(None, "predicted speedup (est.)", lambda r: _x(r.get("speedup_predicted"))),
           Column(None, "note", lambda r: ("skipped: " + r["skipped"]) if r.get("skipped") else _anchor(r))]


def _chart(axes, rows) -> None:
    """Left: peak memory; right: kernel launches; bars per configuration grouped by (space, algorithm)."""
    rows = [r for r in rows if r.get("skipped") is None]
    groups = list(dict.fromkeys((r["space"], r["variant"], r["batch"]) for r in rows))
    kinds = list(dict.fromkeys(r["config"] for r in rows))
    colors = {"baseline": "tab:gray", "stem-on-the-fly": "tab:orange", "cached": "tab:blue",
              "cached-darts-edges": "tab:cyan", "cached-fused": "tab:green"}
    width = 0.8 / max(1, len(kinds))
    for ax, key, scale, label in ((axes[0], "peak_bytes", 2**20, "peak MiB (predicted max_memory_allocated)"),
                                  (axes[1], "launches", 1, "kernel launches per step")):
        for k, kind in enumerate(kinds):
            xs, hs = [], []
            for g, grp in enumerate(groups):
                for r in rows:
                    if (r["space"], r["variant"], r["batch"]) == grp and r["config"] == kind:
                        xs.append(g + (k - (len(kinds) - 1) / 2) * width)
                        hs.append(r[key] / scale)
            ax.bar(xs, hs, width, color=colors.get(kind, "tab:purple"), label=kind)
        ax.set_xticks(range(len(groups)), [f"{s}\n{a}\nbatch {b}" for s, a, b in groups], fontsize=7)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    if rows:
        axes[0].legend(fontsize=7)


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"a check that everything runs: --algos {','.join(QUICK['algos'])} --spaces "
                        f"{','.join(QUICK['spaces'])} --batch-size {QUICK['batch_size']} unless given")
    p.add_argument("--algos", default=None, help=f"comma-separated subset of {','.join(algorithm_variants())} "
                                                 "(default: all)")
    p.add_argument("--spaces", default=None, help="comma-separated subset of the registered spaces (default: all)")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)} (default: all)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="one batch for every algorithm (default: the papers': darts 64, pcdarts 256, gdas 64)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32, or bf16 under CUDA's autocast policy (default: fp32)")
    p.add_argument("--real", action="store_true",
                   help="run on real CPU tensors instead of fake ones (slow at batch 64; checks the instruments)")
    p.add_argument("--gpu", default="H100", choices=tuple(GPUS), help="GPU of the estimates (default: H100)")
    p.add_argument("--stem", default=DEFAULT_STEM, help="the KT-NAS configurations' frozen stem (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="its input size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="initialisation (default: 0)")
    p.add_argument("--recompute", default=None, choices=("none", "edge", "cell"),
                   help="the KT-NAS configurations' ktnas search --recompute (default: search's own, edge)")


def report(args, work_dir=None) -> Report:
    notes: list[str] = []
    rows = bench_step(quick=args.quick, algos=args.algos, spaces=args.spaces, configs=args.configs,
                      batch_size=args.batch_size, precision=args.precision, fake=not args.real, seed=args.seed,
                      stem=args.stem, image_size=args.image_size, gpu=args.gpu, notes=notes,
                      recompute=args.recompute)
    return Report("step", "ktnas bench step: one search step's GPU cost, measured without a GPU", rows, COLUMNS,
                  _chart, device="cpu", notes=notes, chart_panels=2)
