"""``mixed_op``: the one call every supernet edge makes. It validates its arguments and dispatches to an
implementation of the kernel contract (``reference.py`` holds the specification).

Implementations: ``'torch'`` (the PyTorch reference, any device, any dtype) and ``'triton'`` (the fused
kernels of ``triton_mixed.py``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; float32, bfloat16,
float16; every variant). ``'auto'`` takes the environment variable ``KTNAS_KERNELS`` when it is set, else
Triton for CUDA tensors in those dtypes and the reference for everything else. Before 'auto' first uses the
kernels on a device and dtype it runs them once on a tiny edge against the reference (``_probe``): should they
not build there (an old triton, an unsupported GPU) or disagree, it warns once and keeps to the reference. Then
every specialisation (variant, ops, stride, dtypes, shape: what a compile or a launch depends on) is checked on
its first use under 'auto' at the run's own values (``_first_use``): forward and backward of the fused kernels
against the reference on copies of the inputs; one that fails to compile or launch, or disagrees, falls back to
the reference for that specialisation alone, with one warning line (:class:`KernelFallback`). An explicit
``'triton'`` is used as asked. :func:`observe_dispatch` reports which implementation each call ran.

Variants: ``'full'`` (DARTS: ``sum_k w_k op_k(x)``), ``'gdas'`` (only op ``index`` is computed) and ``'pc'``
(PC-DARTS partial channels: the first ``C/k`` channels through the mixed op, the rest bypass, channel shuffle).
:data:`DISPATCH` maps (implementation, variant) to the function that computes it; all of them take the same
arguments. Refusals are one-line ``KernelError`` (kernels/errors.py).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .errors import KernelError
from .reference import is_conv_branch, mixed_op_reference, mixed_op_reference_gdas, mixed_op_reference_pc

IMPLS = ("auto", "torch", "triton")
VARIANTS = ("full", "gdas", "pc")


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_probed: dict = {}  # (device, dtype) -> None when the fused kernels ran right there, else why not


def _probe(device, dtype) -> bool:
    """Whether the fused kernels build, run and agree with the reference on ``device`` in ``dtype`` (checked once,
    on a tiny edge with every kind of op, strides 1 and 2, full and partial channels, forward and backward).
    On failure 'auto' warns once and keeps to the reference."""
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype or torch.float32)
    if key not in _probed:
        try:
            _probed[key] = _probe_run(device, key[1])
        except Exception as e:  # noqa: BLE001 - whatever breaks here, the reference still works
            _probed[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        if _probed[key] is not None:
            warnings.warn(f"the fused Triton kernels do not work on {device} in {key[1]} ({_probed[key]}); "
                          f"using the PyTorch reference (--kernels triton shows the error)", stacklevel=3)
    return _probed[key] is None


def _probe_run(device, dtype) -> str | None:
    ops = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3")
    gen = torch.Generator().manual_seed(0)
    for stride in (1, 2):
        for variant, k in (("full", 1), ("pc", 2)):
            x = torch.randn(2, 4, 5, 5, generator=gen).to(device, dtype)
            w = torch.softmax(torch.randn(len(ops), generator=gen), 0).to(device)
            ho = -(-5 // stride)
            conv = {n: torch.randn(2, 4 // k, ho, ho, generator=gen).to(device, dtype)
                    for n in ops if is_conv_branch(n, stride)}
            why = compare_with_reference(x, w, conv, ops, stride, variant,
                                         dict(pool_bn=True, index=None, k=k, eps=1e-5))["failure"]
            if why is not None:
                return f"results differ from the reference ({variant}, stride {stride}: {why})"
    return None


AUTO_DEVICE_TYPES = ("cuda",)  # where 'auto' takes the fused kernels (the tests add "cpu" under the interpreter)
FIRST_USE_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}  # of the reference's largest value
_first_use: dict = {}  # specialisation -> None (the fused kernels matched the reference there) or why not
_dispatch_observers: list = []


class KernelFallback(UserWarning):
    """The fused kernels fell back to the PyTorch reference (the warning's one line says where and why)."""


def specialisation(x, conv_outs: dict, ops, stride, variant, pool_bn, index, k) -> tuple:
    """What a compile or a launch of the fused kernels depends on: device, dtypes, shape, variant, ops, stride,
    the pools' BN, GDAS' sampled op, PC-DARTS' factor."""
    return (str(x.device), str(x.dtype).replace("torch.", ""), tuple(x.shape), variant, tuple(ops), int(stride),
            bool(pool_bn), index if variant == "gdas" else None, k if variant == "pc" else None,
            tuple(sorted((n, str(t.dtype).replace("torch.", "")) for n, t in conv_outs.items())))


def describe(spec: tuple) -> str:
    """A specialisation in a few words (for warnings and a run's records)."""
    device, dtype, shape, variant, ops, stride, _, index, k, _ = spec
    what = {"gdas": f"gdas {ops[index] if index is not None else ''}", "pc": f"pc k={k}"}.get(variant, variant)
    return f"{what} edge of {len(ops)} ops, stride {stride}, {dtype} {'x'.join(map(str, shape))} on {device}"


@contextlib.contextmanager
def observe_dispatch():
    """``{specialisation: implementation}`` of every ``mixed_op`` call inside the block ('triton' or 'torch';
    calls replayed by a CUDA graph run no Python and are not seen again)."""
    seen: dict = {}
    _dispatch_observers.append(seen)
    try:
        yield seen
    finally:
        _dispatch_observers.remove(seen)


def first_use_failures() -> dict:
    """``{specialisation: why}`` of every specialisation the fused kernels fell back on in this process."""
    return {spec: why for spec, why in _first_use.items() if why is not None}


def _can_check(x) -> bool:
    """Whether a first-use check can run now: real tensors, eagerly (not traced, not inside a CUDA graph's
    capture, which would record it)."""
    if torch.compiler.is_compiling() or _fake_mode_active():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _keep(t):
    return t


def compare_with_reference(x, weights, conv_outs, ops, stride, variant, kw) -> dict:
    """The fused kernels against the reference on copies of one edge's inputs, forward and backward (a seeded
    output gradient; the reference in float32): ``{"errors": {output: [max abs error, largest reference value]},
    "tol": relative tolerance, "failure": None or why not}`` (an exception of the kernels propagates)."""
    gen = torch.Generator().manual_seed(0)
    tol = FIRST_USE_TOL.get(x.dtype, 1e-3)
    res, g = [], None
    # its own autograd scope: no caller's mode, cast policy or saved-tensor hooks (activation checkpointing's
    # would recompute the caller's forward) reaches the comparison
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        for impl in ("triton", "torch"):
            # copies made here, outside any inference mode: a caller's inference tensors cannot take gradients
            up = (lambda t: t.detach().clone()) if impl == "triton" else (lambda t: t.detach().to(torch.float32,
                                                                                                 copy=True))
            xs, ws = up(x).requires_grad_(), up(weights).requires_grad_()
            cs = {n: up(t).requires_grad_() for n, t in conv_outs.items()}
            out = DISPATCH[(impl, variant)](xs, ws, cs, ops, stride, **kw)
            if g is None:
                g = torch.randn(out.shape, generator=gen).to(out.device)
            out.backward(g.to(out.dtype))
            res.append([("out", out)] + [(f"d{n}", t.grad) for n, t in (("x", xs), ("weights", ws), *cs.items())])
    errors, failure = {}, None
    for (name, a), (_, b) in zip(*res):
        if a is None or b is None:
            if (a is not None and a.any()) or (b is not None and b.any()):
                failure = failure or f"{name}: a gradient where the reference has none, or none where it has one"
            continue
        a, b = a.detach().float(), b.detach().float()
        err, scale = float((a - b).abs().max()), float(b.abs().max())
        errors[name] = [err, scale]
        if not torch.isfinite(a).all():
            failure = failure or f"{name}: non-finite values"
        elif err > tol * max(scale, 1e-6):
            failure = failure or (f"{name} differs from the reference by {err:.3g} (largest value {scale:.3g}, "
                                  f"tolerance {tol:g})")
    return dict(errors=errors, tol=tol, failure=failure)


def _checked(spec, x, weights, conv_outs, ops, stride, variant, kw) -> str:
    """'triton' when the specialisation passed its first-use check (run now if it has not been), else 'torch'."""
    if spec not in _first_use:
        if not _can_check(x):
            return "triton"  # checked when it next runs eagerly; the device probe vouches for it meanwhile
        try:
            _first_use[spec] = compare_with_reference(x, weights, conv_outs, ops, stride, variant, kw)["failure"]
        except Exception as e:  # noqa: BLE001 - a compile or launch that fails: the reference still works
            _first_use[spec] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        if _first_use[spec] is not None:
            warnings.warn(f"the fused Triton kernels fell back to the PyTorch reference for a {describe(spec)} "
                          f"({_first_use[spec]})", KernelFallback, stacklevel=4)
    return "torch" if _first_use[spec] is not None else "triton"


def _fake_mode_active() -> bool:
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FakeTensorMode) for m in _get_current_dispatch_mode_stack())


def resolve_impl(impl: str = "auto", device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str:
    """The implementation ``impl`` means for tensors on ``device`` of ``dtype``: 'torch' or 'triton'.

    'auto': ``KTNAS_KERNELS`` if set, else 'triton' for CUDA tensors (any CUDA device when ``device`` is None)
    in float32/bfloat16/float16 where triton is installed, else 'torch'. An explicit 'triton' that cannot run
    here is refused with a one-line error."""
    if impl == "auto":
        impl = os.environ.get("KTNAS_KERNELS", "").strip() or "auto"
    if impl not in IMPLS:
        raise KernelError(f"unknown kernels {impl!r} (from --kernels or KTNAS_KERNELS): use auto, torch or triton")
    if impl == "torch":
        return impl
    from . import triton_mixed  # imported late: TRITON_INTERPRET is read when triton is first imported

    if impl == "triton" and _fake_mode_active() and triton_mixed.triton is not None:
        return impl  # fake tensors (a step profile): the registered op's fake implementation launches nothing

    if impl == "auto":
        on_cuda = (torch.cuda.is_available() if device is None else
                   torch.device(device).type in AUTO_DEVICE_TYPES)
        ok = (on_cuda and triton_mixed.available(device) and (dtype is None or dtype in _TRITON_DTYPES)
              and _probe(device, dtype))
        return "triton" if ok else "torch"
    if not triton_mixed.available(device):
        raise KernelError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1 to interpret the kernels "
                          "on the CPU): use --kernels torch")
    if dtype is not None and dtype not in _TRITON_DTYPES:
        raise KernelError(f"the fused Triton kernels take float32, bfloat16 or float16 inputs, not {dtype}: "
                          f"use --kernels torch")
    return impl


def _fused(name: str):
    """The fused kernels' function ``name``, bound late: ``triton_mixed`` is imported on first use, since
    TRITON_INTERPRET is read when triton is first imported."""
    def call(*args, **kwargs):
        from . import triton_mixed

        return getattr(triton_mixed, name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    return call


# (impl, variant) -> f(x, weights, conv_outs, ops, stride, *, pool_bn, index, k, eps)
DISPATCH = {("torch", "full"): mixed_op_reference, ("torch", "gdas"): mixed_op_reference_gdas,
            ("torch", "pc"): mixed_op_reference_pc, ("triton", "full"): _fused("mixed_op_triton"),
            ("triton", "gdas"): _fused("mixed_op_triton_gdas"), ("triton", "pc"): _fused("mixed_op_triton_pc")}


def mixed_op(x: torch.Tensor, weights: torch.Tensor, conv_outs: dict, ops, stride: int, *, variant: str = "full",
             pool_bn: bool = True, index: int | None = None, k: int = 4, eps: float = 1e-5,
             impl: str = "auto") -> torch.Tensor:
    """One edge's mixed operation (see ``kernels/reference.py`` for the exact semantics).

    x: [N, C, H, W] edge input. weights: [len(ops)]. conv_outs: {op: pre-BN output of its conv body applied to
    ``edge_relu(x)``} (for ``'pc'``: to ``edge_relu(x[:, :C//k])``; for ``'gdas'``: only the sampled op's entry,
    if it is a conv branch). stride: 1 or 2. pool_bn: affine-free BN after pools (DARTS) or not (NB201).
    variant: 'full' | 'gdas' (needs ``index``) | 'pc' (uses ``k``). impl: 'auto' | 'torch' | 'triton'.
    """
    if variant not in VARIANTS:
        raise KernelError(f"unknown mixed-op variant {variant!r}: use one of {', '.join(VARIANTS)}")
    if variant == "gdas" and index is None:
        raise ValueError("variant 'gdas' needs the sampled op's index")
    if variant == "pc" and (not isinstance(k, int) or k < 1 or x.shape[1] % k):
        raise KernelError(f"partial-channel factor k={k!r} must be a positive divisor of the edge's {x.shape[1]} "
                          f"channels: pass --channels divisible by k")
    chosen = resolve_impl(impl, x.device, x.dtype)
    kw = dict(pool_bn=pool_bn, index=index, k=k, eps=eps)
    checked = chosen == "triton" and _auto(impl)
    if checked or _dispatch_observers:
        spec = specialisation(x, conv_outs, ops, stride, variant, pool_bn, index, k)
        if checked:
            chosen = _checked(spec, x, weights, conv_outs, ops, stride, variant, kw)
        for seen in _dispatch_observers:
            seen[spec] = chosen
    return DISPATCH[(chosen, variant)](x, weights, conv_outs, ops, stride, **kw)


def _auto(impl: str) -> bool:
    """Whether ``impl`` leaves the choice to ktnas ('auto', and no ``KTNAS_KERNELS``)."""
    return impl == "auto" and os.environ.get("KTNAS_KERNELS", "").strip() in ("", "auto")
