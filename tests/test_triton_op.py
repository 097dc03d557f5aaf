"""The fused mixed op as a registered operator (``torch.ops.ktnas.mixed_op`` / ``mixed_op_backward``): fake
tensors, its launch counter, torch.compile without graph breaks, opcheck, its FLOP formula. The kernels run in
Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 before triton is imported)."""
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")

from ktnas.kernels import launches  # noqa: E402
from ktnas.kernels import triton_mixed as tm  # noqa: E402
from ktnas.kernels.reference import is_conv_branch  # noqa: E402

if not tm.available("cpu") or os.environ.get("TRITON_INTERPRET", "") in ("", "0"):
    pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

DARTS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
         "dil_conv_5x5")
NB201 = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
# (variant, ops, pool_bn, stride, gdas index, pc k)
CASES = [("full", DARTS, True, 1, None, 1), ("full", NB201, False, 2, None, 1),
         ("gdas", DARTS, True, 2, DARTS.index("max_pool_3x3"), 1), ("gdas", NB201, False, 1, 2, 1),
         ("pc", DARTS, True, 2, None, 2), ("pc", NB201, False, 1, None, 2)]
IDS = [f"{v}-{'darts' if ops is DARTS else 'nb201'}-s{s}" for v, ops, _, s, _, _ in CASES]


def _edge(variant, ops, pool_bn, stride, index, k, dtype=torch.float32, shape=(2, 4, 5, 5), gen=None):
    """(f(x, w, *convs) -> out, x, w, conv tensors) of one small edge (real or fake tensors: whichever mode is
    active)."""
    N, C, H, W = shape
    names = [o for o in dict.fromkeys(ops) if is_conv_branch(o, stride)]
    if variant == "gdas":
        names = [o for o in names if o == ops[index]]
    x = torch.randn(shape, generator=gen).to(dtype)
    w = torch.softmax(torch.randn(len(ops), generator=gen), 0)
    convs = [torch.randn(N, C // k, -(-H // stride), -(-W // stride), generator=gen).to(dtype) for _ in names]

    def f(x, w, *cs):
        conv = dict(zip(names, cs))
        if variant == "gdas":
            return tm.mixed_op_triton_gdas(x, w, conv, ops, stride, pool_bn=pool_bn, index=index)
        if variant == "pc":
            return tm.mixed_op_triton_pc(x, w, conv, ops, stride, pool_bn=pool_bn, k=k)
        return tm.mixed_op_triton(x, w, conv, ops, stride, pool_bn=pool_bn)
    return f, x, w, convs


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched on fake tensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fake_tensors_forward_backward(case, dtype, monkeypatch):
    """Under FakeTensorMode (fake CPU tensors) the op gives outputs and gradients of the right shapes and dtypes
    and launches nothing."""
    for name in tm.LAUNCH_CONFIG:
        monkeypatch.setitem(launches.KERNELS, name, _NoLaunch())
    with FakeTensorMode():
        f, x, w, convs = _edge(*case, dtype=dtype, shape=(64, 8, 16, 16))
        x, w, *convs = _leaves(x, w, *convs)
        out = f(x, w, *convs)
        stride = case[3]
        assert tuple(out.shape) == (64, 8, 16 // stride, 16 // stride) and out.dtype == dtype
        out.backward(torch.randn_like(out))
        assert x.grad.shape == x.shape and x.grad.dtype == dtype
        assert w.grad.shape == w.shape and w.grad.dtype == torch.float32
        for c in convs:
            assert c.grad.shape == c.shape and c.grad.dtype == dtype


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_launch_counts_fake_equal_real(case, one_thread):
    """The launches counted on fake tensors (and their bytes) are those of a real interpreted run, forward and
    backward apart."""
    counts = []
    for fake in (False, True):
        with FakeTensorMode() if fake else torch.device("cpu"):
            f, x, w, convs = _edge(*case, gen=None if fake else torch.Generator().manual_seed(0))
            x, w, *convs = _leaves(x, w, *convs)
            with tm.count_launches() as fwd:
                out = f(x, w, *convs)
            with tm.count_launches() as bwd:
                out.backward(torch.ones_like(out))
        counts.append((dict(fwd), dict(bwd)))
    (rf, rb), (ff, fb) = counts
    assert rf == ff and rb == fb
    assert rf["_fwd_out_kernel"]["launches"] == 1 and rb["_bwd_grad_kernel"]["launches"] == 1
    assert ("_pc_bypass_fwd_kernel" in rf) == ("_pc_bypass_bwd_kernel" in rb) == (case[0] == "pc")
    assert all(c["bytes"] > 0 for c in (rf["_fwd_out_kernel"], rb["_bwd_grad_kernel"]))


def test_count_launches_totals_and_nesting():
    f, x, w, convs = _edge(*CASES[0])
    with tm.count_launches() as outer:
        with tm.count_launches() as inner:
            out = f(*_leaves(x, w, *convs))
        out.sum().backward()
    # full DARTS edge: statistics, finalize, output forward; reduce, finalize, gradients backward
    assert inner.launches == 3 and outer.launches == 6
    assert outer.bytes == sum(c["bytes"] for c in outer.values()) == tm.fused_bytes(x.shape, x.dtype, DARTS)
    assert not launches._OBSERVERS


def test_torch_compile_fullgraph_matches_eager(one_thread):
    """torch.compile(fullgraph=True) over an edge: one graph, no break, the values, gradients and launch counts
    of eager."""
    f, x, w, convs = _edge("pc", DARTS, True, 1, None, 2, gen=torch.Generator().manual_seed(1))

    def loss(x, w, *cs):
        return f(x, w, *cs).square().sum()

    explain = torch._dynamo.explain(loss)(x, w, *convs)
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled, compiled):  # the compiled function twice: tracing, then the cached graph
        leaves = _leaves(x, w, *convs)
        with tm.count_launches() as n:
            value = fn(*leaves)
            value.backward()
        results.append(([value.detach()] + [t.grad for t in leaves], dict(n)))
    (ref, n_ref), *others = results
    for got, n in others:
        assert n == n_ref
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_opcheck():
    """torch.library.opcheck: schema, fake implementation, autograd registration, AOT dispatch (dynamic shapes),
    for the forward and the backward operator."""
    gen = torch.Generator().manual_seed(2)
    for stride, k in ((1, 1), (2, 2)):  # 2 channels: each opcheck runs the interpreted kernels many times
        x = torch.randn(2, 2, 5, 5, generator=gen, requires_grad=True)
        Ho = -(-5 // stride)
        convs = [torch.randn(2, 2 // k, Ho, Ho, generator=gen, requires_grad=True) for _ in range(2)]
        wvec = torch.rand(6, generator=gen, requires_grad=True)
        flags = (stride, True, k, stride == 1, True, True)
        torch.library.opcheck(torch.ops.ktnas.mixed_op.default, (x, wvec, convs, 1e-5, *flags))
        out, mean, rstd = torch.ops.ktnas.mixed_op(x, wvec, convs, 1e-5, *flags)
        g = torch.randn_like(out)
        # first-order only (as the kernels' backward always was): no input of the backward requires grad
        torch.library.opcheck(torch.ops.ktnas.mixed_op_backward.default,
                              (g, x.detach(), wvec.detach(), mean.detach(), rstd.detach(),
                               [c.detach() for c in convs], *flags))


def test_flop_formula():
    """FlopCounterMode counts the documented arithmetic, on real and on fake tensors: skip alone at stride 1,
    E = 2*3*4*4 output elements: forward 2 per element (weight, accumulate); backward reduce 2 + 1, dx 2."""
    counts = []
    for mode in (torch.device("cpu"), FakeTensorMode()):
        with mode:
            x, w = _leaves(torch.randn(2, 3, 4, 4), torch.ones(1))
            flops = FlopCounterMode(display=False)
            with flops:
                tm.mixed_op_triton(x, w, {}, ("skip_connect",), 1).sum().backward()
            counts.append({str(op): n for op, n in flops.get_flop_counts()["Global"].items()})
    E = 2 * 3 * 4 * 4
    assert counts[0] == counts[1] == {"ktnas.mixed_op": 2 * E, "ktnas.mixed_op_backward": 3 * E + 2 * E}
    # a DARTS edge: the conv branches' statistics and normalisation, the pools' windows, PC's bypass all count
    with FakeTensorMode():
        f, x, w, convs = _edge("pc", DARTS, True, 2, None, 2, shape=(64, 8, 16, 16))
        flops = FlopCounterMode(display=False)
        with flops:
            f(*_leaves(x, w, *convs)).sum().backward()
    assert flops.get_total_flops() > 100 * 64 * 4 * 8 * 8
