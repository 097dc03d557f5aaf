"""'auto' kernels prove themselves per specialisation: on its first use at the run's shapes and dtype, the fused
op's forward and backward are compared with the reference on copies of the inputs; one that fails to compile or
launch, or disagrees, falls back to the reference for that specialisation alone, with one warning line. Tested on
the CPU with 'auto' allowed to take the kernels here (Triton's interpreter), and CUDA's grid limits."""
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot be tested")

from ktnas.kernels import KernelError, launches, mixed, mixed_op  # noqa: E402
from ktnas.kernels import triton_mixed as tm  # noqa: E402

if not tm.available("cpu"):
    pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)", allow_module_level=True)

DARTS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
         "dil_conv_5x5")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """'auto' takes the fused kernels on CPU tensors (interpreted), with fresh probe and first-use records."""
    monkeypatch.setattr(mixed, "AUTO_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(mixed, "_probed", {})
    monkeypatch.setattr(mixed, "_first_use", {})
    monkeypatch.delenv("KTNAS_KERNELS", raising=False)


def _edge(stride, n=3, seed=0):
    """A DARTS edge's inputs: x [n, 4, 6, 6], weights, the conv branches' pre-BN outputs (4 at stride 1; 5 at
    stride 2, where skip_connect is a conv branch)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 6, 6, generator=gen)
    w = torch.softmax(torch.randn(len(DARTS), generator=gen), 0)
    names = [o for o in DARTS if o not in ("none", "max_pool_3x3", "avg_pool_3x3")
             and (o != "skip_connect" or stride == 2)]
    convs = {o: torch.randn(n, 4, 6 // stride, 6 // stride, generator=gen) for o in names}
    return x, w, convs


def _run(impl, stride, **kw):
    x, w, convs = _edge(stride, **kw)
    x, w = x.requires_grad_(), w.requires_grad_()
    out = mixed_op(x, w, convs, DARTS, stride, impl=impl)
    out.square().sum().backward()
    return out.detach(), x.grad, w.grad


def test_launch_that_fails_falls_back_for_its_specialisation(auto_on_cpu, monkeypatch):
    """The real kernels, one of which cannot launch with 5 conv branches (a stride-2 DARTS edge; the device probe's
    tiny edge has at most 2, so it passes): that specialisation runs the reference with one warning, values
    identical to it; the stride-1 edge keeps the fused kernels. Decided once: no second warning, no second try."""
    real = launches.KERNELS["_fwd_out_kernel"]
    tries = []

    class NoFiveBranches:
        def __getitem__(self, grid):
            def run(*args, **kw):
                if kw["K"] == 5:
                    tries.append(grid)
                    raise RuntimeError("out of resources: required 300000 bytes of shared memory")
                return real[grid](*args, **kw)
            return run

    monkeypatch.setitem(launches.KERNELS, "_fwd_out_kernel", NoFiveBranches())
    with pytest.warns(mixed.KernelFallback, match=r"fell back to the PyTorch reference for a full edge of 8 ops, "
                                                  r"stride 2, float32 3x4x6x6 on cpu \(RuntimeError: out of resources"):
        with mixed.observe_dispatch() as seen:
            got = _run("auto", 2)
    assert list(seen.values()) == ["torch"]
    for a, b in zip(got, _run("torch", 2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with mixed.observe_dispatch() as seen:
        _run("auto", 2)  # no warning (pytest's filter would turn one into an error below)
        fused = _run("auto", 1)
    assert sorted(seen.values()) == ["torch", "triton"] and len(tries) == 1
    for a, b in zip(fused, _run("torch", 1)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert list(map(mixed.describe, mixed.first_use_failures())) == ["full edge of 8 ops, stride 2, float32 3x4x6x6 "
                                                                     "on cpu"]


def test_kernels_with_wrong_values_fall_back(auto_on_cpu, monkeypatch):
    """Fused kernels that run but give values 1% off at the run's batch (the probe's batch of 2 is right): the
    first use sees it and that specialisation runs the reference."""
    ref = mixed.DISPATCH[("torch", "full")]

    def off(x, *a, **kw):
        y = ref(x, *a, **kw)
        return y * 1.01 if x.shape[0] > 2 else y

    monkeypatch.setitem(mixed.DISPATCH, ("triton", "full"), off)
    with pytest.warns(mixed.KernelFallback, match=r"out differs from the reference by"):
        got = _run("auto", 1)
    for a, b in zip(got, _run("torch", 1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_explicit_triton_is_used_as_asked(auto_on_cpu, monkeypatch):
    """--kernels triton: no first-use check, no fallback (the error shows)."""
    def broken(*a, **kw):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(mixed.DISPATCH, ("triton", "full"), broken)
    with pytest.raises(RuntimeError, match="no kernel image"):
        _run("triton", 1)
    assert mixed._first_use == {}


@pytest.mark.parametrize("fault", ["launch", "values"])
def test_search_completes_when_a_specialisation_fails(search_store, tmp_path, auto_on_cpu, monkeypatch, fault):
    """A search with 'auto' kernels whose stride-2 edges cannot launch, or give values 1% off: one warning per
    failing specialisation, the search completes with the genotype and losses of the search on the reference ops,
    and metrics.jsonl and config.json record what ran (specialisations on each implementation, the fallbacks and
    why)."""
    from ktnas.engine.search.loop import SearchConfig, search

    ref = mixed.DISPATCH[("torch", "full")]

    def fused_stand_in(x, w, conv_outs, ops, stride, **kw):  # the reference, unless 5 conv branches (stride 2)
        if len(conv_outs) == 5 and fault == "launch":
            raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")
        return ref(x, w, conv_outs, ops, stride, **kw) * (1.01 if len(conv_outs) == 5 else 1)

    base = dict(features=search_store, epochs=1, batch_size=8, limit=32, layers=2, channels=4, reductions=(1,),
                device="cpu", progress=False, capture="none")
    plain = search(SearchConfig(out=str(tmp_path / "plain"), kernels="torch", **base))
    monkeypatch.setitem(mixed.DISPATCH, ("triton", "full"), fused_stand_in)
    with pytest.warns(mixed.KernelFallback) as w:
        got = search(SearchConfig(out=str(tmp_path / "auto"), kernels="auto", **base))
    assert got["genotype"] == plain["genotype"]
    assert got["last"]["val_loss"] == pytest.approx(plain["last"]["val_loss"], rel=1e-6)
    rec = json.loads((tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()[-1])
    fell = rec["kernels"]["fell_back"]
    fallbacks = [x for x in w if issubclass(x.category, mixed.KernelFallback)]  # (a tiny search also warns that
    # its weights barely moved)
    assert len(fallbacks) == len(fell) > 0 and rec["kernels"]["triton"] > 0 and rec["kernels"]["torch"] == len(fell)
    why = "OutOfResources" if fault == "launch" else "out differs from the reference"
    assert all("stride 2" in k and why in v for k, v in fell.items())
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["ran"]["kernels"] == rec["kernels"]


def test_grid_stays_within_cuda_limits_at_a_huge_batch():
    """N*H*W past 16.7 M positions (batch 4096 at 64x64): more than 65,535 tiles per channel. Tiles go on grid
    axis 0 (up to 2**31 - 1), channels on axis 1, so every launch fits CUDA's limits (fake tensors: nothing runs)."""
    grids = []
    with FakeTensorMode(), launches.observe_launches(lambda launch: grids.append((launch.kernel, launch.grid))):
        x = torch.empty(4096, 4, 64, 64, requires_grad=True)
        w = torch.empty(len(DARTS), requires_grad=True)
        convs = {o: torch.empty(4096, 2, 32, 32, requires_grad=True)
                 for o in ("skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")}
        out = tm.mixed_op_triton_pc(x, w, convs, DARTS, 2, k=2)
        out.backward(torch.empty_like(out))
    tiled = [g for _, g in grids if len(g) == 2]
    assert max(g[0] for g in tiled) > 65535 and len(tiled) == 6
    assert all(all(a <= lim for a, lim in zip(g, launches.GRID_LIMITS)) for _, g in grids)


def test_grid_over_the_limits_is_refused(monkeypatch):
    """A launch whose grid exceeds the limits is refused with one line (under 'auto', a fallback)."""
    monkeypatch.setattr(launches, "GRID_LIMITS", (2**31 - 1, 2, 65535))
    x, w, convs = _edge(1)
    with pytest.raises(KernelError, match=r"_fwd_stats_kernel: grid \(1, 4\) exceeds CUDA's limits \(2147483647, 2\)"):
        tm.mixed_op_triton(x, w, convs, DARTS, 1)


def test_first_use_from_inference_mode_is_checked_not_refused(auto_on_cpu, monkeypatch):
    """A specialisation first used under torch.inference_mode (evaluation, prediction) is checked like any other:
    its inputs are inference tensors, the comparison's copies are not; no fallback."""
    monkeypatch.setitem(mixed.DISPATCH, ("triton", "full"), mixed.DISPATCH[("torch", "full")])
    with torch.inference_mode(), mixed.observe_dispatch() as seen:
        x, w, convs = _edge(1)  # made in inference mode, as a network's activations there are
        out = mixed_op(x, w, convs, DARTS, 1)
    assert list(seen.values()) == ["triton"] and mixed.first_use_failures() == {}
    torch.testing.assert_close(out, mixed_op(x, w, convs, DARTS, 1, impl="torch"), rtol=0, atol=0)
