"""``ktnas doctor``: the self-check to run on a new machine, driver or library version before searching there.

Four checks, each ``ok``, ``FAIL`` or ``skipped`` (with why), shown as a table, written as JSON with ``--out``; the
command exits non-zero when one fails.

1. ``versions``: Python, torch, triton, CUDA, the device.
2. ``kernels``: every specialisation of the fused mixed op that the default supernets use (DARTS and NAS-Bench-201
   on the embedded stem's 24x16x16 features, batch 64; variants full, PC-DARTS and every GDAS op, both strides)
   against the PyTorch reference in the chosen precision: forward and backward, the largest error of each
   against its tolerance -- the comparison ``--kernels auto`` makes on a specialisation's first use. On the CPU the
   kernels run in Triton's interpreter (a child process with ``TRITON_INTERPRET=1`` where this one started
   without it) at small shapes with the same ops, strides and variants.
3. ``capture``: a small supernet's captured step (a CUDA graph; on the CPU ``torch.compile`` with the aot_eager
   backend) against the eager step, from the same state over the same batches: every parameter within tolerance.
4. ``memory`` (CUDA): the step profile's predicted peak of the default DARTS search step against a real step's
   ``max_memory_allocated``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ktnas.cache.errors import KtnasError

DEFAULT_FEATURES = dict(in_channels=24, resolution=16, shape=[24, 16, 16], num_classes=10)  # the embedded stem's
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
MEMORY_TOLERANCE = 0.2  # the profile's peak within 20% of the measured one


def _check(name: str, fn) -> dict:
    t0 = time.perf_counter()
    try:
        status, detail, data = fn()
    except Exception as e:  # noqa: BLE001 - a check that breaks is a failed check, the others still run
        status, detail, data = "FAIL", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}", {}
    return dict(check=name, status=status, detail=detail, seconds=round(time.perf_counter() - t0, 2), data=data)


# ------------------------------------------------------------------------------------------------ versions
def versions(device: torch.device) -> tuple:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    from importlib.metadata import version

    data = dict(python=platform.python_version(), torch=torch.__version__, triton=tv, cuda=torch.version.cuda,
                ktnas=version("ktnas"), device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor())
    detail = f"torch {data['torch']}, triton {tv}, CUDA {data['cuda']}, {data['device_name'] or device}"
    return "ok", detail, data


# ------------------------------------------------------------------------------------------------- kernels
def edge_shapes(space: str, batch: int = 64) -> list[tuple]:
    """(x shape, stride, ops, pool_bn) of every distinct edge of ``space``'s default KT-NAS supernet on the
    embedded stem's features, read off one forward on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ktnas.kernels import observe_dispatch

    from ktnas.engine.layout import resolve_layout
    from ktnas.engine.spaces import get_space
    from ktnas.engine.search.supernet import Supernet

    layout = resolve_layout(get_space(space), DEFAULT_FEATURES["resolution"], "search").as_dict()
    with FakeTensorMode(allow_non_fake_inputs=True), observe_dispatch() as seen:
        net = Supernet(space, 10, DEFAULT_FEATURES["in_channels"], kernels="torch", **layout)
        net(torch.empty(batch, *DEFAULT_FEATURES["shape"]))
    return sorted({(spec[2], spec[5], spec[4], spec[6]) for spec in seen})


def kernel_cases(full: bool) -> list[dict]:
    """The specialisations to check: per space and distinct edge, the full op, PC-DARTS (k=4) and GDAS for every
    op (``full``), or at small shapes (batch 2, 8 channels, at most 6x6) the full op, PC-DARTS and GDAS for one
    pool and one conv op (the interpreter's budget)."""
    cases = []
    from ktnas.engine.spaces import SPACES

    for space in SPACES:
        for shape, stride, ops, pool_bn in edge_shapes(space):
            if not full:
                shape = (2, 8, min(shape[2], 6), min(shape[3], 6))
            indices = range(len(ops)) if full else [i for i, o in enumerate(ops) if o in ("avg_pool_3x3",
                                                                                         "nor_conv_3x3",
                                                                                         "sep_conv_3x3")]
            variants = [("full", None, 1)] + ([("pc", None, 4)] if shape[1] % 4 == 0 else [])
            variants += [("gdas", i, 1) for i in indices]
            for variant, index, k in variants:
                cases.append(dict(space=space, shape=list(shape), stride=stride, ops=list(ops), pool_bn=pool_bn,
                                  variant=variant, index=index, k=k))
    unique = {json.dumps(c, sort_keys=True): c for c in cases}
    return list(unique.values())


def _case_inputs(case: dict, device, dtype):
    from ktnas.kernels.reference import is_conv_branch

    gen = torch.Generator().manual_seed(len(json.dumps(case)))
    N, C, H, W = case["shape"]
    s, k, ops = case["stride"], case["k"], case["ops"]
    names = [o for o in dict.fromkeys(ops) if is_conv_branch(o, s)]
    if case["variant"] == "gdas":
        names = [o for o in names if o == ops[case["index"]]]
    x = torch.randn(N, C, H, W, generator=gen).to(device, dtype)
    w = torch.softmax(torch.randn(len(ops), generator=gen), 0).to(device)
    convs = {o: torch.randn(N, C // k, -(-H // s), -(-W // s), generator=gen).to(device, dtype) for o in names}
    return x, w, convs


def run_kernel_cases(device: str, precision: str, full: bool) -> list[dict]:
    """Each case of :func:`kernel_cases` compared with the reference: the case and its errors, tolerance and
    failure (an exception of the kernels counts as one)."""
    from ktnas.kernels.mixed import compare_with_reference

    dtype, rows = PRECISIONS[precision], []
    for case in kernel_cases(full):
        x, w, convs = _case_inputs(case, device, dtype)
        kw = dict(pool_bn=case["pool_bn"], index=case["index"], k=case["k"], eps=1e-5)
        try:
            r = compare_with_reference(x, w, convs, tuple(case["ops"]), case["stride"], case["variant"], kw)
        except Exception as e:  # noqa: BLE001 - a compile or launch that fails is this case's failure
            r = dict(errors={}, tol=None, failure=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
        rows.append(dict(case, **r))
    return rows


def kernels(device: torch.device, precision: str) -> tuple:
    from ktnas.kernels import triton_mixed

    if triton_mixed.triton is None:
        return "skipped", "triton is not installed: every search runs the PyTorch reference", {}
    if device.type == "cuda":
        rows = run_kernel_cases(str(device), precision, full=True)
    elif triton_mixed.available("cpu"):
        rows = run_kernel_cases("cpu", precision, full=False)
    else:  # triton was imported without the interpreter: check in a child process that has it
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "ktnas.engine.profile.doctor", precision], capture_output=True,
                           text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"the interpreted kernel check failed: {(r.stderr.strip().splitlines() or [''])[-1]}")
        rows = json.loads(r.stdout)
    failed = [r for r in rows if r["failure"]]
    worst = max((e[0] / max(e[1], 1e-6) / r["tol"], r) for r in rows if r["tol"] for e in r["errors"].values())
    detail = (f"{len(rows) - len(failed)}/{len(rows)} specialisations match the reference in {precision}"
              f"{' (interpreted, small shapes)' if device.type != 'cuda' else ''}; worst error {worst[0]:.2f} of its "
              f"tolerance")
    if failed:
        f = failed[0]
        detail += (f"; failing: {f['space']} {f['variant']} stride {f['stride']} {'x'.join(map(str, f['shape']))}: "
                   f"{f['failure']}")
    return ("FAIL" if failed else "ok"), detail, dict(cases=rows)


# ------------------------------------------------------------------------------------------------- capture
def _small_run(device: torch.device, capture: str, precision: str, seed: int = 0):
    from ktnas.engine.search.loop import SearchConfig, resolve_config
    from ktnas.engine.search.run import SearchRun

    cfg = resolve_config(SearchConfig(features="unused", batch_size=8, epochs=2, layers=1, channels=8,
                                      reductions=(), device=str(device), recompute="none", capture=capture,
                                      precision=precision, compile_backend="aot_eager", progress=False))
    torch.manual_seed(seed)
    return SearchRun(cfg, device, DEFAULT_FEATURES)


def capture(device: torch.device, precision: str) -> tuple:
    """The captured (CUDA graph; compiled on other devices) step against the eager one from the same state:
    GRAPH_WARMUP + 2 steps on the same batches; every parameter compared."""
    from ktnas.engine.search.capture import CaptureFallback, GRAPH_WARMUP

    mode = "graph" if device.type == "cuda" else "compile"
    eager, captured = _small_run(device, "none", precision), _small_run(device, mode, precision)
    captured.model.load_state_dict(copy.deepcopy(eager.model.state_dict()))
    gen = torch.Generator().manual_seed(1)
    steps = GRAPH_WARMUP + 2 if mode == "graph" else 2
    batches = [(torch.randn(8, *DEFAULT_FEATURES["shape"], generator=gen).to(device),
                torch.randint(0, 10, (8,), generator=gen).to(device)) for _ in range(2 * steps)]
    for run in (eager, captured):
        run.model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("error", CaptureFallback)  # a fallback here is the failure this check looks for
            with run.stepper(0, torch.Generator().manual_seed(2), np.random.default_rng(2)) as step:
                for i in range(steps):
                    step(*batches[2 * i], *batches[2 * i + 1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tol = 1e-3 if precision == "fp32" else 5e-2
    a, b = dict(eager.model.named_parameters()), dict(captured.model.named_parameters())
    worst = max((float((b[n] - p).detach().abs().max()) / max(float(p.detach().abs().max()), 1e-6), n)
                for n, p in a.items())
    report = captured.steps_report
    detail = (f"{'CUDA graph' if mode == 'graph' else 'torch.compile (aot_eager)'}: {steps} steps ({report['mode']}: "
              f"{report['replays']} replayed, {report['called']} called) against eager ones; largest relative "
              f"parameter difference {worst[0]:.2g} ({worst[1]}), tolerance {tol:g}")
    return ("ok" if worst[0] <= tol else "FAIL"), detail, dict(max_rel_diff=worst[0], parameter=worst[1],
                                                              steps=report)


# -------------------------------------------------------------------------------------------------- memory
def memory(device: torch.device, precision: str) -> tuple:
    """The step profile's peak of the default DARTS search step (batch 64, the embedded stem's features) against
    one real step's ``max_memory_allocated`` (the second step: optimiser state and gradients in place)."""
    if device.type != "cuda":
        return "skipped", "the measured peak is CUDA's allocator's: run on a CUDA device", {}
    from ktnas.engine.search.loop import SearchConfig, resolve_config
    from ktnas.engine.search.run import SearchRun
    from ktnas.engine.profile.step import profile_search_step

    from ktnas.kernels import resolve_impl

    cfg = resolve_config(SearchConfig(features="unused", device=str(device), precision=precision, capture="none",
                                      progress=False))
    # the profile of the step as it runs here: the kernels 'auto' picks on this device (fused ones keep less)
    profiled = dataclasses.replace(cfg, kernels=resolve_impl(cfg.kernels, device))
    predicted = profile_search_step(profiled, DEFAULT_FEATURES, cfg.batch_size)["peak_bytes"]
    torch.manual_seed(0)
    run = SearchRun(cfg, device, DEFAULT_FEATURES)
    run.model.train()
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    x = torch.randn(cfg.batch_size, *DEFAULT_FEATURES["shape"], device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    run.search_step(run.arch_start, x, y, x, y, gen, rng)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run.search_step(run.arch_start, x, y, x, y, gen, rng)
    torch.cuda.synchronize(device)
    measured = torch.cuda.max_memory_allocated(device)
    err = predicted / measured - 1
    detail = (f"DARTS step, batch {cfg.batch_size}, recompute {cfg.recompute}: predicted {predicted / 2**20:.1f} MiB, "
              f"measured {measured / 2**20:.1f} MiB ({err:+.1%}; tolerance {MEMORY_TOLERANCE:.0%})")
    return ("ok" if abs(err) <= MEMORY_TOLERANCE else "FAIL"), detail, dict(predicted_bytes=predicted,
                                                                          measured_bytes=measured)


# --------------------------------------------------------------------------------------------------- doctor
def doctor(device: str = "auto", precision: str = "fp32", out: str | None = None) -> dict:
    """Run the checks (module docstring); ``{"ok": bool, "checks": [...]}``, also written to ``out``/doctor.json."""
    from ktnas.cache.runtime import resolve_device

    if precision not in PRECISIONS:
        raise KtnasError(f"unknown --precision {precision!r}: use {' or '.join(PRECISIONS)}")
    dev = resolve_device(device)
    checks = [_check("versions", lambda: versions(dev)), _check("kernels", lambda: kernels(dev, precision)),
              _check("capture", lambda: capture(dev, precision)), _check("memory", lambda: memory(dev, precision))]
    result = dict(ok=all(c["status"] != "FAIL" for c in checks), device=str(dev), precision=precision, checks=checks)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "doctor.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def cmd_doctor(args) -> int:
    r = doctor(args.device, args.precision, args.out)
    print(f"ktnas doctor: {r['device']}, {r['precision']}")
    print(f"{'check':10s} {'status':8s} {'seconds':>7s}  detail")
    for c in r["checks"]:
        print(f"{c['check']:10s} {c['status']:8s} {c['seconds']:7.1f}  {c['detail']}")
    if args.out:
        print(f"written: {Path(args.out) / 'doctor.json'}")
    return 0 if r["ok"] else 1


def add_doctor_parser(subparsers) -> None:
    s = subparsers.add_parser("doctor", help="check this machine: versions, the fused kernels, the captured step, "
                                             "the memory profile",
                              description="A one-minute self-check of a machine before searching on it: the fused "
                                          "kernels against the reference at the default supernets' shapes, the "
                                          "captured step against the eager one, the step profile against a real "
                                          "step's peak. Exit status 1 when a check fails.")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    s.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS), help="(default: fp32)")
    s.add_argument("--out", default=None, help="folder for doctor.json")
    s.set_defaults(func=cmd_doctor)


if __name__ == "__main__":  # the interpreted kernel check, in a process started with TRITON_INTERPRET=1
    with contextlib.redirect_stdout(sys.stderr):
        rows = run_kernel_cases("cpu", sys.argv[1] if len(sys.argv) > 1 else "fp32", full=False)
    print(json.dumps(rows))
