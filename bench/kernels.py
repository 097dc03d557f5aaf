"""``ktnas bench kernels``: one search edge's mixed operation, forward + backward, three ways, in one run.

For each input shape (N, C, H, W) and dtype it times ``out = mixed_op(x, w, conv_outs)`` followed by the gradients
of x, of the op weights and of every conv branch's pre-BN output (``torch.autograd.grad``, so nothing accumulates):

- ``eager``: the PyTorch reference (``kernels/reference.py``) op by op, as classic DARTS code runs it;
- ``compile``: ``torch.compile`` of that reference (inductor fuses what it can; compiled once per shape, untimed);
- ``triton``: the fused kernels (``kernels/triton_mixed.py``).

Two edges: ``darts`` (all 8 DARTS ops: the conv branches enter as given pre-BN outputs, as in the supernet) and
``free`` (none, skip, 3x3 max and avg pool: the parameter-free passes alone, whose speed is bound by memory
traffic). Times are medians: ``triton.testing.do_bench`` on CUDA (it clears the L2 cache between runs), a
perf_counter median on the CPU; each call takes the next of ``--sets`` input sets, so no run reuses the last one's
data. Peak memory is ``max_memory_allocated`` during one forward + backward above what the inputs already hold
(CUDA only). Every implementation's output and gradients are checked against the eager reference first
(``max_err``, relative to the reference's largest value). The copy bandwidth (``dst.copy_(src)``, bytes read +
written per second) is measured in the same run; the fused ``free`` edge's rate is the bytes its four passes move
(see :func:`fused_bytes`) per second, and ``bw_frac`` that rate over the copy bandwidth.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from ktnas.cache.errors import KtnasError
from ktnas.engine.spaces import SPACES
from ktnas.kernels.reference import is_conv_branch, mixed_op_reference

from .report import Column, Report

HELP = "one edge's mixed op, forward + backward: fused Triton kernels vs eager reference vs torch.compile"
SHAPES = ((64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8), (256, 16, 32, 32))
QUICK_SHAPES = ((8, 16, 16, 16), (4, 24, 9, 9))
# the DARTS space's edge, and its parameter-free ops alone (the ops the kernels compute themselves)
EDGES = {"darts": SPACES["darts"].ops, "free": tuple(o for o in SPACES["darts"].ops if not is_conv_branch(o, 1))}
IMPLS = ("eager", "compile", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = dict(vs_eager=2.0, vs_compile=1.3, mem_saving=0.4, bw_frac=0.6)


def add_arguments(p) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--shapes", default=None,
                   help="N,C,H,W[;N,C,H,W...] (default: " + "; ".join(",".join(map(str, s)) for s in SHAPES) + ")")
    p.add_argument("--dtypes", default=None, help="of fp32, bf16, fp16 (default: fp32,bf16; fp32 with --quick)")
    p.add_argument("--edges", default="darts,free", help="of darts, free (default: %(default)s)")
    p.add_argument("--impls", default=",".join(IMPLS), help="of eager, compile, triton (default: %(default)s)")
    p.add_argument("--stride", type=int, default=1, choices=(1, 2), help="edge stride (default: 1)")
    p.add_argument("--sets", type=int, default=4, help="input sets rotated through the runs (default: 4)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, fp32, fewer runs: a check that everything runs (CPU, CI); with --aot: the "
                        "most demanding specialisation of each kernel only")
    p.add_argument("--aot", action="store_true",
                   help="instead of timing: compile every kernel specialisation the supernets use for --archs "
                        "(no GPU needed) and report registers, spills and shared memory")
    p.add_argument("--archs", default="80,90", help="with --aot: CUDA compute capabilities (default: %(default)s)")


def _csv(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise KtnasError(f"--{what} {text!r}: choose from {', '.join(allowed)} (comma-separated)")
    return items


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for part in text.split(";"):
        try:
            s = tuple(int(v) for v in part.split(","))
        except ValueError:
            s = ()
        if len(s) != 4 or min(s) < 1:
            raise KtnasError(f"--shapes {text!r}: give N,C,H,W with positive integers, several separated by ';'")
        shapes.append(s)
    return shapes


def fused_bytes(shape, dtype: torch.dtype, ops, stride: int = 1, pool_bn: bool = True) -> int:
    """Bytes the fused kernels read and write for one forward + backward of an edge: the launches' own estimates
    (:func:`ktnas.kernels.triton_mixed.fused_bytes`, each tensor counted once per pass that touches it)."""
    from ktnas.kernels import triton_mixed  # imported late: TRITON_INTERPRET is read when triton is first imported

    return triton_mixed.fused_bytes(shape, dtype, ops, stride, pool_bn)


def _inputs(shape, dtype, device, ops, stride, sets: int, seed: int = 0):
    N, C, H, W = shape
    Ho, Wo = -(-H // stride), -(-W // stride)
    gen = torch.Generator().manual_seed(seed)
    convs = [o for o in dict.fromkeys(ops) if is_conv_branch(o, stride)]
    out = []
    for _ in range(sets):
        x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
        w = torch.softmax(torch.randn(len(ops), generator=gen), 0).to(device).requires_grad_()
        cs = [torch.randn(N, C, Ho, Wo, generator=gen).to(device, dtype).requires_grad_() for _ in convs]
        g = torch.randn(N, C, Ho, Wo, generator=gen).to(device, dtype)
        out.append((x, w, cs, g))
    return convs, out


def _edge_fn(impl: str, ops, convs, stride):
    """f(x, w, *conv tensors) -> out, for one implementation (None: not available here, with the reason)."""
    ops = tuple(ops)

    def reference(x, w, *cs):
        return mixed_op_reference(x, w, dict(zip(convs, cs)), ops, stride)

    if impl == "eager":
        return reference, None
    if impl == "compile":
        # every case is a fresh compile: the closures share one code object, whose recompilations would
        # otherwise hit dynamo's cache limit after a few cases and silently fall back to eager
        torch._dynamo.reset()
        return torch.compile(reference, dynamic=False), None
    from ktnas.kernels import triton_mixed

    if not triton_mixed.available(None if torch.cuda.is_available() else "cpu"):
        return None, "needs CUDA (or TRITON_INTERPRET=1 set before triton is imported)"

    def fused(x, w, *cs):
        return triton_mixed.mixed_op_triton(x, w, dict(zip(convs, cs)), ops, stride)
    return fused, None


def _fwd_bwd(fn):
    def step(x, w, cs, g):
        out = fn(x, w, *cs)
        return out, torch.autograd.grad(out, [x, w, *cs], g)
    return step


def _timer(device: torch.device, quick: bool):
    if device.type == "cuda":
        import triton.testing

        return lambda f: triton.testing.do_bench(f, warmup=10 if quick else 25, rep=40 if quick else 200,
                                                 return_mode="median")

    def cpu_median(f, min_runs: int = 1 if quick else 7, min_s: float = 0.0 if quick else 0.5):
        f()  # warm-up
        times, t_end = [], time.perf_counter() + min_s
        while len(times) < min_runs or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            f()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu_median


def copy_bandwidth(device: torch.device, timer, nbytes: int) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` of ``nbytes`` each (device-to-device on CUDA)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms / 1e3)


def _max_err(got, ref) -> float:
    err, scale = 0.0, 1e-12
    for a, b in zip(got, ref):
        b = b.detach().double()
        err = max(err, (a.detach().double() - b).abs().max().item())
        scale = max(scale, b.abs().max().item())
    return err / scale


def _peak(step, data, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    res = step(*data)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del res
    return peak


def bench_kernels(*, device: str = "auto", shapes=None, dtypes=("fp32", "bf16"), edges=("darts", "free"),
                  impls=IMPLS, stride: int = 1, sets: int = 4, quick: bool = False) -> tuple[list[dict], dict]:
    """Rows, one per (edge, shape, dtype): ``{edge, shape, dtype, device, <impl>_ms, <impl>_peak_bytes,
    <impl>_err, speedup_vs_eager, speedup_vs_compile, mem_saving, gb_per_s, bw_frac}`` (None where not measured),
    and ``info`` (copy bandwidth, skipped implementations with the reason)."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KtnasError("--device cuda: no CUDA device here: use --device cpu")
    if sets < 1:
        raise KtnasError(f"--sets must be >= 1, got {sets}")
    shapes = list(shapes or (QUICK_SHAPES if quick else SHAPES))
    timer = _timer(dev, quick)
    copy_bytes = (16 << 20) if quick or dev.type == "cpu" else (512 << 20)
    info = dict(device=str(dev), copy_bytes_per_s=copy_bandwidth(dev, timer, copy_bytes), skipped={})
    rows = []
    for edge in edges:
        ops = EDGES[edge]
        for shape in shapes:
            for dname in dtypes:
                dtype = DTYPES[dname]
                convs, data = _inputs(shape, dtype, dev, ops, stride, sets)
                row = dict(edge=edge, shape="x".join(map(str, shape)), dtype=dname, stride=stride, device=str(dev))
                for impl in IMPLS:
                    row.update({f"{impl}_ms": None, f"{impl}_peak_bytes": None, f"{impl}_err": None})
                ref = None
                for impl in ("eager", *[i for i in impls if i != "eager"]):
                    fn, why = _edge_fn(impl, ops, convs, stride)
                    if fn is None:
                        info["skipped"][impl] = why
                        continue
                    step = _fwd_bwd(fn)
                    try:
                        out, grads = step(*data[0])  # compiles (compile) / builds the kernels (triton), untimed
                    except Exception as e:  # noqa: BLE001 - a backend that fails here is reported, not fatal
                        info["skipped"][impl] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
                        continue
                    res = [out, *grads]
                    if impl == "eager":
                        ref = res
                    row[f"{impl}_err"] = _max_err(res, ref)
                    del out, grads, res
                    if impl == "eager" and "eager" not in impls:
                        continue
                    turn = iter(range(1 << 62))
                    row[f"{impl}_ms"] = timer(lambda: step(*data[next(turn) % sets]))
                    row[f"{impl}_peak_bytes"] = _peak(step, data[0], dev)
                _ratios(row, fused_bytes(shape, dtype, ops, stride), info["copy_bytes_per_s"])
                rows.append(row)
    info["interpreted"] = dev.type == "cpu" and any(r["triton_ms"] is not None for r in rows)
    return rows, info


def _ratios(row: dict, nbytes: int, copy_bps: float) -> None:
    t, e, c = row.get("triton_ms"), row.get("eager_ms"), row.get("compile_ms")
    row["speedup_vs_eager"] = e / t if t and e else None
    row["speedup_vs_compile"] = c / t if t and c else None
    pe, pt = row.get("eager_peak_bytes"), row.get("triton_peak_bytes")
    row["mem_saving"] = 1 - pt / pe if pe and pt is not None else None
    row["gb_per_s"] = nbytes / (t / 1e3) / 1e9 if t else None
    row["bw_frac"] = nbytes / (t / 1e3) / copy_bps if t and row["edge"] == "free" else None


def _f(fmt):
    return lambda v: "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt(v)


_ms, _x, _e = _f(lambda v: f"{v:.3f}"), _f(lambda v: f"{v:.2f}x"), _f(lambda v: f"{v:.1e}")
_mib = _f(lambda v: f"{v / 2**20:.1f}")
COLUMNS = [Column("edge", "edge"), Column("shape", "N x C x H x W"), Column("dtype", "dtype"),
           Column("eager_ms", "eager ms", _ms), Column("compile_ms", "compile ms", _ms),
           Column("triton_ms", "triton ms", _ms),
           Column("speedup_vs_eager", f"vs eager (>= {TARGETS['vs_eager']}x)", _x),
           Column("speedup_vs_compile", f"vs compile (>= {TARGETS['vs_compile']}x)", _x),
           Column("eager_peak_bytes", "eager MiB", _mib), Column("compile_peak_bytes", "compile MiB", _mib),
           Column("triton_peak_bytes", "triton MiB", _mib),
           Column("mem_saving", f"memory saved (>= {TARGETS['mem_saving']:.0%})", _f(lambda v: f"{v:.0%}")),
           Column("gb_per_s", "triton GB/s", _f(lambda v: f"{v:.0f}" if v >= 10 else f"{v:.2f}")),
           Column("bw_frac", f"of copy bw (free; >= {TARGETS['bw_frac']:.0%})", _f(lambda v: f"{v:.0%}")),
           Column(None, "max err (compile / triton)",
                  lambda r: f"{_e(r['compile_err'])} / {_e(r['triton_err'])}")]


def _chart(ax, rows) -> None:
    labels = [f"{r['edge']} {r['shape']} {r['dtype']}" for r in rows]
    xs = range(len(rows))
    width = 0.27
    series = [("speedup_vs_eager", "triton speed-up vs eager", "tab:blue"),
              ("speedup_vs_compile", "triton speed-up vs torch.compile", "tab:orange")]
    for i, (key, label, color) in enumerate(series):
        ax.bar([x + (i - 1) * width for x in xs], [r[key] or 0 for r in rows], width, label=label, color=color)
    ax.bar([x + width for x in xs], [(1 / (1 - r["mem_saving"]) if r["mem_saving"] is not None
                                      and r["mem_saving"] < 1 else 0) for r in rows], width,
           label="eager peak memory / triton's", color="tab:green")
    for y, c in ((TARGETS["vs_eager"], "tab:blue"), (TARGETS["vs_compile"], "tab:orange")):
        ax.axhline(y, color=c, ls="--", lw=1)
    ax.axhline(1, color="black", lw=0.8)
    ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("ratio (higher is better; dashed: targets)")
    ax.legend(fontsize=7)


def report(args, work_dir=None) -> Report:
    """Run :func:`bench_kernels` (or, with ``--aot``, :func:`bench_aot`) with the CLI's arguments."""
    if args.aot:
        return aot_report(args)
    dtypes = _csv(args.dtypes or ("fp32" if args.quick else "fp32,bf16"), DTYPES, "dtypes")
    rows, info = bench_kernels(device=args.device, shapes=parse_shapes(args.shapes) if args.shapes else None,
                               dtypes=dtypes, edges=_csv(args.edges, EDGES, "edges"),
                               impls=_csv(args.impls, IMPLS, "impls"), stride=args.stride, sets=args.sets,
                               quick=args.quick)
    notes = [f"forward + backward (gradients of x, the op weights and the conv branches' outputs) of one edge at "
             f"stride {args.stride}; edge 'darts': the 8 DARTS ops, 'free': none, skip, max and avg pool",
             f"medians of {'triton.testing.do_bench' if info['device'].startswith('cuda') else 'perf_counter'} "
             f"over {args.sets} rotated input sets; copy bandwidth in the same run: "
             f"{info['copy_bytes_per_s'] / 1e9:.1f} GB/s (bytes read + written)",
             "peak memory: max_memory_allocated above the inputs during one forward + backward (CUDA only); "
             "max err: largest difference from the eager reference over output and gradients, relative to its "
             "largest value"]
    if info["interpreted"]:
        notes.append("triton on the CPU runs in Triton's interpreter: its times say nothing about the kernels")
    notes += [f"{impl} skipped: {why}" for impl, why in info["skipped"].items()]
    return Report("kernels", "ktnas bench kernels: fused mixed op vs eager vs torch.compile", rows, COLUMNS, _chart,
                  device=info["device"], notes=notes)


# ------------------------------------------------------------------------------------------ --aot
def bench_aot(*, dtypes=("fp32", "bf16", "fp16"), archs=(80, 90), quick: bool = False) -> list[dict]:
    """One row per kernel specialisation the supernets launch (:func:`ktnas.kernels.aot.kernel_specs`) and
    architecture, compiled ahead of time (:func:`ktnas.kernels.aot.compile_report`); ``quick``: the most
    demanding specialisation of each kernel and dtype only (:func:`ktnas.kernels.aot.most_demanding`)."""
    from ktnas.kernels import aot

    specs = aot.kernel_specs(dtypes)
    if quick:
        specs = aot.most_demanding(specs)
    return aot.compile_report(specs, archs)


def _archs(text: str) -> list[int]:
    try:
        archs = [int(a) for a in text.split(",") if a.strip()]
    except ValueError:
        archs = []
    if not archs or any(a < 70 or a >= 100 for a in archs):
        raise KtnasError(f"--archs {text!r}: give CUDA compute capabilities such as 80,90 (comma-separated)")
    return archs


def _spec(r) -> str:
    c = r["constexprs"]
    flags = [f[4:].lower() for f in ("HAS_SKIP", "HAS_AVG", "HAS_MAX") if c.get(f)]
    parts = (["+".join(flags)] if flags else []) + (["pool_bn"] if c.get("POOL_BN") else [])
    parts += [f"{k}={c[k]}" for k in ("K", "STRIDE", "BLOCK", "BT") if k in c]
    return " ".join(parts)


AOT_COLUMNS = [Column("kernel", "kernel"), Column("arch", "arch", lambda v: f"sm_{v}"), Column("dtype", "dtype"),
               Column(None, "constexprs", _spec), Column("num_warps", "warps"),
               Column("registers", "registers", _f(str)),
               Column(None, "spill stores / loads (B)",
                      lambda r: "-" if r["spill_stores"] is None else f"{r['spill_stores']} / {r['spill_loads']}"),
               Column("stack", "stack (B)", _f(str)), Column("shared", "shared (B)", _f(str)),
               Column(None, "compiled", lambda r: "yes" if r["compiled"] else f"no: {r['error']}"),
               Column("used_by", "first edge using it"), Column("edges", "edges")]


def _aot_chart(ax, rows) -> None:
    xs = range(len(rows))
    ax.bar(xs, [r["registers"] or 0 for r in rows],
           color=["tab:red" if r["spill_stores"] else "tab:blue" for r in rows])
    ax.axhline(255, color="black", ls="--", lw=0.8)
    ax.set_xticks(list(xs), [f"{r['kernel'].strip('_')} sm_{r['arch']} {r['dtype']}" for r in rows],
                  rotation=90, fontsize=5)
    ax.set_ylabel("registers per thread (red: spills; dashed: the 255 limit)")


def aot_report(args) -> Report:
    dtypes = _csv(args.dtypes or "fp32,bf16,fp16", DTYPES, "dtypes")
    archs = _archs(args.archs)
    rows = bench_aot(dtypes=dtypes, archs=archs, quick=args.quick)
    bad = [r for r in rows if not r["compiled"] or r["spill_stores"] or r["spill_loads"]]
    notes = ["every specialisation the supernets launch (DARTS and NAS-Bench-201 ops, stride 1 and 2, full / GDAS "
             "/ PC-DARTS k=4, batch 64 at 32x32, 16x16 and 8x8) as the fused op's wrapper passes it, compiled with "
             "triton.compile for each architecture; registers, spills and stack from the ptxas shipped with triton "
             "(-v), shared memory as triton allocates it" + ("; --quick: the most demanding specialisation of "
                                                             "each kernel and dtype only" if args.quick else ""),
             f"{len(rows)} compiled kernels: " + (f"{len(bad)} failed to compile or spill" if bad else
                                                  "all compiled, none spills")]
    return Report("kernels-aot", "ktnas bench kernels --aot: the fused kernels compiled for " +
                  ", ".join(f"sm_{a}" for a in archs), rows, AOT_COLUMNS, _aot_chart, device="cpu", notes=notes)
