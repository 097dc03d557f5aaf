"""Ahead-of-time compile check of the fused mixed op's Triton kernels for sm_80 / sm_90, without a GPU.

:func:`kernel_specs` lists every kernel specialisation the supernets ask for: it runs the fused op (forward and
backward) on fake tensors over both search spaces' edges -- DARTS (8 ops, BN after pools) and NAS-Bench-201
(5 ops, bare pools), stride 1 and 2, the full mixed op, GDAS (each op alone) and PC-DARTS (k=4), at the
supernets' shapes at batch 64 -- and records each launch the op would issue (:func:`triton_mixed.observe_launches`).
So the constexprs (BLOCK, K, HAS_*, POOL_BN, STRIDE, BT), num_warps and argument types are exactly the ones the
wrapper passes. Specialisations are told apart by kernel, dtypes, constexprs, num_warps and the integer arguments
equal to 1 (which triton's JIT turns into constants); the other integers take the values of the first edge that
asks for it.

:func:`compile_report` compiles each for the given architectures with ``triton.compile`` (as the JIT would:
its own argument binder, 16-byte aligned pointers) in subprocesses without ``TRITON_INTERPRET`` (the interpreter
replaces ``@triton.jit`` functions), then runs the ``ptxas`` shipped with triton (``-v``) on the PTX for
registers, spill stores / loads and stack; shared memory is triton's (dynamic) allocation. Every figure is
deterministic for a given triton; nothing here is timed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARCHS = (80, 90)
SPACES = {"darts": (("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                     "dil_conv_3x3", "dil_conv_5x5"), True),
          "nb201": (("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"), False)}
BATCH = 64
# (channels, resolution) of the supernets' edges: classic DARTS 16 @ 32x32, 32 @ 16x16, 64 @ 8x8; KT-NAS'
# supernets on cached features 32 @ 16x16 and 64 @ 8x8 (M = 64*32*32, 64*16*16, 64*8*8 positions per channel)
SHAPES = ((16, 32), (32, 16), (64, 8))
VARIANTS = ("full", "gdas", "pc")
PC_K = 4


def _edges(spaces, variants, strides, shapes, batch):
    """(label, variant, ops, pool_bn, stride, index, k, (N, C, H, W)) of every edge the supernets build."""
    for space in spaces:
        ops, pool_bn = SPACES[space]
        for stride in strides:
            for C, H in shapes:
                shape = (batch, C, H, H)
                for variant in variants:
                    label = f"{space} {variant} stride {stride} {'x'.join(map(str, shape))}"
                    if variant == "gdas":
                        for i, op in enumerate(ops):
                            if op != "none":
                                yield f"{label} {op}", variant, ops, pool_bn, stride, i, 1, shape
                    else:
                        yield label, variant, ops, pool_bn, stride, None, PC_K if variant == "pc" else 1, shape


def _run_edge(variant, ops, pool_bn, stride, index, k, shape, dtype):
    from . import triton_mixed as tm
    from .reference import is_conv_branch

    N, C, H, W = shape
    conv_shape = (N, C // k, -(-H // stride), -(-W // stride))
    x = torch.empty(shape, dtype=dtype, requires_grad=True)
    w = torch.empty(len(ops), requires_grad=True)
    convs = {o: torch.empty(conv_shape, dtype=dtype, requires_grad=True) for o in ops if is_conv_branch(o, stride)}
    if variant == "gdas":
        convs = {o: t for o, t in convs.items() if o == ops[index]}
    fn = {"full": tm.mixed_op_triton, "gdas": tm.mixed_op_triton_gdas, "pc": tm.mixed_op_triton_pc}[variant]
    out = fn(x, w, convs, ops, stride, pool_bn=pool_bn, index=index, k=k)
    out.backward(torch.empty_like(out))


def _arg(a):
    return f"tensor:{str(a).removeprefix('torch.')}" if isinstance(a, torch.dtype) else a


def kernel_specs(dtypes=tuple(DTYPES), *, spaces=tuple(SPACES), variants=VARIANTS, strides=(1, 2), shapes=SHAPES,
                 batch: int = BATCH) -> list[dict]:
    """The distinct kernel specialisations the fused op launches on those edges: ``{kernel, dtype, constexprs,
    num_warps, args, grid, used_by, edges}`` (``args``: 'tensor:<dtype>' or the number; ``used_by``: the first
    edge asking for it; ``edges``: how many do), in launch order."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import triton_mixed as tm

    specs: dict = {}
    for dname in dtypes:
        for label, variant, ops, pool_bn, stride, index, k, shape in _edges(spaces, variants, strides, shapes, batch):
            seen = []
            with FakeTensorMode(), tm.observe_launches(seen.append):
                _run_edge(variant, ops, pool_bn, stride, index, k, shape, DTYPES[dname])
            for launch in seen:
                args = tuple(_arg(a) for a in launch.args)
                key = (launch.kernel, dname, launch.constexprs, launch.num_warps,
                       tuple(a if isinstance(a, str) or a == 1 else type(a).__name__ for a in args))
                if key in specs:
                    specs[key]["edges"] += 1
                    continue
                specs[key] = dict(kernel=launch.kernel, dtype=dname, constexprs=dict(launch.constexprs),
                                  num_warps=launch.num_warps, args=list(args), grid=list(launch.grid),
                                  used_by=f"{label} {dname}", edges=1)
    return list(specs.values())


def most_demanding(specs) -> list[dict]:
    """Per kernel and dtype, the specialisation with the most to do (conv branches, pools, skip, BN; then the
    widest tiles): the likeliest to run out of registers. In ``specs``' order."""
    def work(s):
        c = s["constexprs"]
        return (c.get("K", 0) + sum(bool(c.get(f)) for f in ("HAS_SKIP", "HAS_AVG", "HAS_MAX", "POOL_BN")),
                c.get("BLOCK", 0), c.get("BT", 0))
    best: dict = {}
    for s in specs:
        key = (s["kernel"], s["dtype"])
        if key not in best or work(s) > work(best[key]):
            best[key] = s
    return [s for s in specs if best[(s["kernel"], s["dtype"])] is s]


def compile_report(specs, archs=ARCHS, jobs: int | None = None) -> list[dict]:
    """Compile every spec for every architecture in ``archs``; one row per (spec, arch): the spec's fields plus
    ``arch``, ``compiled``, ``error`` (one line, or None), ``registers``, ``spill_stores``, ``spill_loads``,
    ``stack`` (bytes), ``shared`` (bytes). Runs ``jobs`` subprocesses (default: the CPU count, at most 8) without
    TRITON_INTERPRET."""
    items = [dict(spec, arch=int(arch)) for spec in specs for arch in archs]
    if not items:
        return []
    jobs = max(1, min(jobs or min(os.cpu_count() or 1, 8), len(items)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = []
    for j in range(jobs):
        p = subprocess.Popen([sys.executable, "-m", "ktnas.kernels.aot"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append((p, items[j::jobs]))
    results = [None] * len(items)
    for j, (p, chunk) in enumerate(procs):
        out, err = p.communicate(json.dumps(chunk))
        if p.returncode != 0:
            last = (err.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the AOT compile subprocess failed ({p.returncode}): {last}")
        for i, row in enumerate(json.loads(out.strip().splitlines()[-1])):
            results[j + i * jobs] = row
    return results


_PTXAS = {"registers": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
          "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}


def _compile_one(item: dict) -> dict:
    """Compile one spec for one architecture (in a process where the kernels are JIT functions)."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    from . import triton_mixed as tm

    row = dict(item, compiled=False, error=None, registers=None, spill_stores=None, spill_loads=None, stack=None,
               shared=None)
    try:
        fn = tm.KERNELS[item["kernel"]]
        target = GPUTarget("cuda", item["arch"], 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        args = [MockTensor(getattr(torch, a.split(":", 1)[1])) if isinstance(a, str) else a for a in item["args"]]
        kw = dict(item["constexprs"], num_warps=item["num_warps"])
        bound, specialization, opts = binder(*args, **kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, opts)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        ptx = kernel.asm["ptx"]
        gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)  # sm_90a for 90: what triton compiled for
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            r = subprocess.run([get_ptxas(item["arch"]).path, "-v", f"--gpu-name={gpu}", path, "-o",
                                os.path.join(d, "k.cubin")], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError((r.stderr.strip().splitlines() or ["ptxas failed"])[-1])
        for key, pat in _PTXAS.items():
            m = re.search(pat, r.stderr)
            row[key] = int(m.group(1)) if m else 0
        row.update(compiled=True, shared=int(kernel.metadata.shared))
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a row of the report
        row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:300]}"
    return row


def _main() -> int:
    items = json.loads(sys.stdin.read())
    print(json.dumps([_compile_one(item) for item in items]))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
