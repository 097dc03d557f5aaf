"""The fused Triton 'full' mixed op against the PyTorch reference (float64), values and gradients, through the
Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set here, before triton is imported)."""
import os
import sys

# the interpreter is chosen when triton is imported: a triton imported earlier in this process without it stays off
_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "") in ("", "0")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")
if _LATE and not torch.cuda.is_available():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU: run this file alone, "
                "or with TRITON_INTERPRET=1 in the environment", allow_module_level=True)

from ktnas.kernels import launches
from ktnas.kernels import triton_mixed as tm
from ktnas.kernels.reference import is_conv_branch, mixed_op_reference, mixed_op_reference_gdas, mixed_op_reference_pc

if not tm.available():
    pytest.skip("Triton kernels unavailable (no CUDA and TRITON_INTERPRET not set before triton was imported)",
                allow_module_level=True)

DARTS = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
         "dil_conv_3x3", "dil_conv_5x5"]
NB201 = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DEVICE = "cuda" if torch.cuda.is_available() and (_LATE or os.environ["TRITON_INTERPRET"] in ("", "0")) else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launches, "_POISON", True)  # every kernel-written buffer starts as NaN


def _nonzero(t):
    return torch.where(t == 0, torch.full_like(t, 0.25), t)


def _inputs(shape, ops, stride, dtype, gen, wdtype=torch.float32, ties=False, k=1):
    N, C, H, W = shape
    Ho, Wo = -(-H // stride), -(-W // stride)
    Cc = C // k  # channels of the conv branches (PC-DARTS: a fraction)
    if ties:  # small integers: many equal maxima in the pooling windows
        x = torch.randint(1, 4, shape, generator=gen).to(dtype)
    else:
        x = _nonzero(torch.randn(shape, generator=gen)).to(dtype)
    w = torch.softmax(torch.randn(len(ops), generator=gen), 0).to(wdtype)
    conv = {}
    for name in ops:
        if is_conv_branch(name, stride) and name not in conv:
            scale = 0.5 + 2 * torch.rand((), generator=gen)
            shift = torch.randn((), generator=gen)
            conv[name] = _nonzero(torch.randn(N, Cc, Ho, Wo, generator=gen) * scale + shift).to(dtype)
    g = _nonzero(torch.randn(N, C, Ho, Wo, generator=gen)).to(dtype)
    return x, w, conv, g


def _close(got, ref, tol, what):
    if got is None and ref is None:  # neither is connected to the input (GDAS' 'none')
        return
    assert got is not None, f"{what}: no gradient where the reference has one"
    got = got.detach().double()
    ref = torch.zeros_like(got) if ref is None else ref.detach()  # None: the reference does not use the input
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element left unwritten?)"
    scale = max(ref.abs().max().item(), 1e-6)
    err = (got - ref).abs().max().item()
    assert err <= tol * scale + tol * ref.abs().mean().item(), f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _variant(variant, index, k):
    """(reference, triton) callables of one variant with the signature f(x, w, conv, ops, stride, pool_bn)."""
    if variant == "gdas":
        return (lambda x, w, c, ops, s, pool_bn: mixed_op_reference_gdas(x, w, c, ops, s, pool_bn=pool_bn, index=index),
                lambda x, w, c, ops, s, pool_bn: tm.mixed_op_triton_gdas(x, w, c, ops, s, pool_bn=pool_bn, index=index))
    if variant == "pc":
        return (lambda x, w, c, ops, s, pool_bn: mixed_op_reference_pc(x, w, c, ops, s, pool_bn=pool_bn, k=k),
                lambda x, w, c, ops, s, pool_bn: tm.mixed_op_triton_pc(x, w, c, ops, s, pool_bn=pool_bn, k=k))
    return (lambda x, w, c, ops, s, pool_bn: mixed_op_reference(x, w, c, ops, s, pool_bn=pool_bn),
            lambda x, w, c, ops, s, pool_bn: tm.mixed_op_triton(x, w, c, ops, s, pool_bn=pool_bn))


def _check(shape, ops, stride, dtype, pool_bn=True, seed=0, wdtype=torch.float32, ties=False, variant="full",
           index=None, k=1):
    gen = torch.Generator().manual_seed(seed)
    x, w, conv, g = _inputs(shape, ops, stride, dtype, gen, wdtype, ties, k)
    reference, fused = _variant(variant, index, k)
    if variant == "gdas":  # only the sampled op's conv output is given (and needed)
        conv = {n: t for n, t in conv.items() if n == ops[index]}
    x, w, g = x.to(DEVICE), w.to(DEVICE), g.to(DEVICE)
    conv = {k: v.to(DEVICE) for k, v in conv.items()}
    # reference in float64 on upcast copies of the very same values
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    c64 = {k: v.double().requires_grad_() for k, v in conv.items()}
    ref = reference(x64, w64, c64, ops, stride, pool_bn)
    ref.backward(g.double())
    # triton
    xt = x.clone().requires_grad_()
    wt = w.clone().requires_grad_()
    ct = {k: v.clone().requires_grad_() for k, v in conv.items()}
    out = fused(xt, wt, ct, ops, stride, pool_bn)
    assert out.dtype == dtype and tuple(out.shape) == tuple(ref.shape)
    out.backward(g)
    tol = TOL[dtype]
    _close(out, ref, tol, "out")
    _close(xt.grad, x64.grad, tol, "dx")
    if variant == "gdas":  # the one-op kernels give the sampled weight alone a gradient
        assert (w64.grad != 0).sum() <= 1 and (wt.grad[torch.arange(len(ops)) != index] == 0).all()
    assert (xt.grad is None or xt.grad.dtype == dtype) and wt.grad.dtype == wdtype
    _close(wt.grad, w64.grad, tol, "dweights")
    for k, t in ct.items():
        assert t.grad.dtype == dtype
        _close(t.grad, c64[k].grad, tol, f"d conv_outs[{k}]")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 5, 7, 5), (2, 3, 6, 6)])
def test_darts_full_float32(shape, stride):
    _check(shape, DARTS, stride, torch.float32, seed=hash((shape, stride)) % 1000)


@pytest.mark.parametrize("stride", [1, 2])
def test_nb201_no_pool_bn_float32(stride):
    _check((2, 3, 7, 5), NB201, stride, torch.float32, pool_bn=False, seed=11 + stride)


@pytest.mark.parametrize("stride", [1, 2])
def test_darts_pools_without_bn(stride):
    _check((2, 3, 5, 5), DARTS, stride, torch.float32, pool_bn=False, seed=21 + stride)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_op_subsets(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    names = DARTS + ["nor_conv_1x1"]
    perm = torch.randperm(len(names), generator=gen)[: 1 + seed * 2].tolist()
    ops = [names[i] for i in perm]
    _check((2, 3, 5, 7), ops, 1 + seed % 2, torch.float32, pool_bn=bool(seed % 2 == 0), seed=seed)


@pytest.mark.parametrize("ops", [["max_pool_3x3"], ["avg_pool_3x3"], ["skip_connect"], ["none"],
                                 ["sep_conv_3x3"], ["max_pool_3x3", "avg_pool_3x3", "max_pool_3x3"]])
def test_single_and_repeated_ops(ops):
    for stride in (1, 2):
        _check((2, 3, 5, 5), ops, stride, torch.float32, seed=len(ops) + stride)


@pytest.mark.parametrize("stride", [1, 2])
def test_several_tiles_per_channel(stride, monkeypatch):
    monkeypatch.setattr(launches, "_MAX_BLOCK", 32)  # 32 positions per program: the per-tile partials must add up
    _check((2, 3, 7, 9), DARTS, stride, torch.float32, seed=51 + stride)
    _check((3, 5, 5, 7), NB201, stride, torch.float32, pool_bn=False, seed=61 + stride)


@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_ties_first_max(stride):
    _check((2, 3, 7, 7), ["max_pool_3x3", "avg_pool_3x3"], stride, torch.float32, pool_bn=False, seed=5,
           ties=True)
    _check((1, 3, 5, 5), ["max_pool_3x3"], stride, torch.float32, pool_bn=True, seed=6, ties=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
def test_half_inputs(dtype, stride):
    _check((2, 3, 5, 7), DARTS, stride, dtype, seed=31 + stride)
    _check((1, 3, 7, 5), NB201, stride, dtype, pool_bn=False, seed=41 + stride, wdtype=dtype)


def test_errors_match_reference():
    x = torch.randn(1, 3, 5, 5)
    w = torch.ones(2) / 2
    with pytest.raises(ValueError, match="lacks"):
        tm.mixed_op_triton(x, w, {}, ["none", "sep_conv_3x3"], 1)
    with pytest.raises(ValueError, match="shape"):
        tm.mixed_op_triton(x, w, {"sep_conv_3x3": torch.randn(1, 3, 5, 5)}, ["none", "sep_conv_3x3"], 2)
    with pytest.raises(ValueError, match="stride"):
        tm.mixed_op_triton(x, w, {}, ["none", "skip_connect"], 3)
    with pytest.raises(ValueError, match="float32"):
        tm.mixed_op_triton(x.double(), w, {}, ["none", "avg_pool_3x3"], 1)


def test_available():
    assert tm.available() and tm.available(DEVICE)


# ------------------------------------------------------------------------------------------ GDAS and PC-DARTS
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_gdas_every_sampled_op(space, stride):
    ops, pool_bn = (DARTS, True) if space == "darts" else (NB201, False)
    for index in range(len(ops)):
        _check((2, 3, 5, 7), ops, stride, torch.float32, pool_bn=pool_bn, seed=71 + index + 10 * stride,
               variant="gdas", index=index)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gdas_half(dtype):
    _check((1, 3, 5, 5), DARTS, 2, dtype, seed=81, variant="gdas", index=DARTS.index("max_pool_3x3"))
    _check((1, 3, 5, 5), DARTS, 1, dtype, seed=82, variant="gdas", index=DARTS.index("sep_conv_5x5"))


def test_gdas_straight_through_reaches_every_logit():
    """Through the hard Gumbel vector (one_hot - p.detach() + p), dL/dalpha is nonzero for every op."""
    gen = torch.Generator().manual_seed(3)
    x = _nonzero(torch.randn(2, 3, 5, 5, generator=gen)).to(DEVICE)
    alpha = torch.randn(len(DARTS), generator=gen, requires_grad=True)
    p = torch.softmax(alpha.to(DEVICE), 0)
    index = DARTS.index("avg_pool_3x3")
    hard = torch.nn.functional.one_hot(torch.tensor(index), len(DARTS)).float().to(DEVICE) - p.detach() + p
    out = tm.mixed_op_triton_gdas(x, hard, {}, DARTS, 1, index=index)
    (out * _nonzero(torch.randn(out.shape, generator=gen)).to(DEVICE)).sum().backward()
    assert (alpha.grad != 0).all()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape,k", [((2, 8, 5, 7), 4), ((1, 12, 7, 5), 4), ((2, 6, 5, 5), 2), ((2, 3, 5, 5), 3)])
def test_pc_darts(shape, k, stride):
    _check(shape, DARTS, stride, torch.float32, seed=91 + k + stride, variant="pc", k=k)


@pytest.mark.parametrize("stride", [1, 2])
def test_pc_nb201_and_ties(stride):
    _check((2, 8, 7, 7), NB201, stride, torch.float32, pool_bn=False, seed=101 + stride, variant="pc", k=4)
    # equal maxima in the bypass' 2x2 windows: the gradient goes to the first one, as PyTorch's max pool
    _check((2, 8, 7, 5), ["max_pool_3x3", "skip_connect"], stride, torch.float32, seed=111 + stride, ties=True,
           variant="pc", k=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
def test_pc_half(dtype, stride):
    _check((2, 8, 5, 7), DARTS, stride, dtype, seed=121 + stride, variant="pc", k=4)


def test_pc_k1_is_full():
    _check((2, 4, 5, 5), DARTS, 1, torch.float32, seed=131, variant="pc", k=1)


def test_pc_several_tiles(monkeypatch):
    monkeypatch.setattr(launches, "_MAX_BLOCK", 32)
    for stride in (1, 2):
        _check((3, 8, 7, 9), DARTS, stride, torch.float32, seed=141 + stride, variant="pc", k=4)


def test_auto_probe(monkeypatch):
    """'auto' trusts the kernels on a device only after they built, ran and matched the reference there once."""
    from ktnas.kernels import mixed

    monkeypatch.setattr(mixed, "_probed", {})
    with torch.inference_mode():  # the first call may come from evaluation code
        assert mixed._probe(DEVICE, torch.float32) and list(mixed._probed.values()) == [None]
    reference = {v: mixed.DISPATCH[("torch", v)] for v in mixed.VARIANTS}
    for broken, why, dtype in ((lambda v: lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no sm_50 support")),
                                "no sm_50", torch.bfloat16),
                               (lambda v: lambda *a, **kw: reference[v](*a, **kw) * 1.01, "differ from the reference",
                                torch.float32)):
        monkeypatch.setattr(mixed, "_probed", {})
        for v in mixed.VARIANTS:  # the fused kernels of every variant broken
            monkeypatch.setitem(mixed.DISPATCH, ("triton", v), broken(v))
        with pytest.warns(UserWarning, match=why):
            assert not mixed._probe(DEVICE, dtype)
        assert not mixed._probe(DEVICE, dtype)  # decided once: no second warning, no second try
