"""The supernet: shapes, the classic networks' parameter counts, parameter groups, and edges against OPS."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ktnas.cache.errors import KtnasError
from ktnas.engine.ops import OPS
from ktnas.engine.spaces import get_space
from ktnas.engine.layout import resolve_layout
from ktnas.engine.search.supernet import MixedEdge, Supernet, count_parameters
from ktnas.kernels import KernelError, mixed_op, resolve_impl


def kt_layout(space, resolution):
    """(layers, channels, reductions) of the KT-NAS search network on features of ``resolution`` px."""
    lay = resolve_layout(get_space(space), resolution)
    return lay.layers, lay.channels, lay.reductions


def tiny(space="darts", stem="cached", **kw):
    kw = dict(dict(layers=3, channels=4, reductions=(1,)), **kw)
    return Supernet(space, 5, 16 if stem == "cached" else 3, stem=stem, **kw)


@pytest.mark.parametrize("space", ["darts", "nb201"])
@pytest.mark.parametrize("stem,shape", [("cached", (16, 16, 16)), ("conv", (3, 32, 32))])
def test_output_shapes(space, stem, shape):
    torch.manual_seed(0)
    m = tiny(space, stem)
    assert m(torch.randn(4, *shape)).shape == (4, 5)


def darts_search_params(C=16, num_classes=10, layers=8, steps=4, multiplier=4, stem_multiplier=3):
    """DARTS' model_search.Network parameter count, from its structure (alphas excluded)."""
    def edge(C, stride):
        sep = lambda k: 2 * (C * k * k + C * C)  # two (depthwise k x k + pointwise) blocks, BN affine-free
        dil = lambda k: C * k * k + C * C
        skip = C * C if stride == 2 else 0       # FactorizedReduce: two 1x1 convs to C/2
        return sep(3) + sep(5) + dil(3) + dil(5) + skip

    C_curr = stem_multiplier * C
    n = 3 * C_curr * 9 + 2 * C_curr              # stem conv + affine BN
    C_pp, C_p, C_curr = C_curr, C_curr, C
    for i in range(layers):
        red = i in (layers // 3, 2 * layers // 3)
        C_curr = C_curr * 2 if red else C_curr
        n += C_pp * C_curr + C_p * C_curr        # preprocess0 (ReLUConvBN 1x1 or FactorizedReduce), preprocess1
        n += sum(edge(C_curr, 2 if red and j < 2 else 1) for s in range(steps) for j in range(2 + s))
        C_pp, C_p = C_p, multiplier * C_curr
    return n + C_p * num_classes + num_classes


def nb201_search_params(C=16, N=5, num_classes=10):
    """NAS-Bench-201's TinyNetworkDarts parameter count (arch parameters excluded)."""
    cell = lambda C: 6 * (C * C + 9 * C * C)     # nor_conv_1x1 + nor_conv_3x3 per edge, BN affine-free
    block = lambda a, b: 9 * a * b + 2 * b + 9 * b * b + 2 * b + a * b  # ResNet basic block + avgpool/1x1 shortcut
    n = 3 * C * 9 + 2 * C
    n += N * cell(C) + block(C, 2 * C) + N * cell(2 * C) + block(2 * C, 4 * C) + N * cell(4 * C)
    return n + 2 * 4 * C + 4 * C * num_classes + num_classes


def test_classic_darts_parameter_count():
    m = Supernet("darts", 10, 3, stem="conv", layers=8, channels=16, reductions=(2, 5))
    assert count_parameters(m) == darts_search_params() == 1930618  # DARTS' log: param size = 1.930618MB
    assert count_parameters(m, arch=True) == 1930618 + 2 * 14 * 8


def test_classic_nb201_parameter_count():
    m = Supernet("nb201", 10, 3, stem="conv", layers=17, channels=16, reductions=(5, 11))
    assert count_parameters(m) == nb201_search_params() == 1686106
    assert count_parameters(m, arch=True) == 1686106 + 6 * 5


def test_kt_layouts():
    assert kt_layout("darts", 32) == (8, 16, (2, 5))
    assert kt_layout("darts", 16) == (5, 32, (2,))
    assert kt_layout("darts", 8) == (2, 64, ())
    assert kt_layout("nb201", 16) == (11, 32, (5,))


@pytest.mark.parametrize("space,edge_norm", [("darts", False), ("darts", True), ("nb201", False)])
def test_parameter_groups(space, edge_norm):
    m = tiny(space, edge_norm=edge_norm)
    sd = m.state_dict()
    for t, a in m.alphas().items():
        assert isinstance(a, nn.Parameter) and f"alpha_{t}" in sd
    arch, weights = {id(p) for p in m.arch_parameters()}, {id(p) for p in m.weight_parameters()}
    assert not arch & weights and arch | weights == {id(p) for p in m.parameters()}
    assert len(arch) == len(m.alphas()) * (2 if edge_norm else 1)
    assert not any(b is not None for mod in m.modules() for b in mod.buffers(recurse=False))


@pytest.mark.parametrize("space", ["darts", "nb201"])
@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_edge_equals_classic_mixed_op(space, stride):
    """The fused-contract edge == DARTS' MixedOp (sum of OPS modules, BN after pools in DARTS) on the same weights."""
    torch.manual_seed(0)
    sp, C = get_space(space), 6
    edge = MixedEdge(C, stride, sp).double()
    classic = []
    for name in sp.ops:
        op = OPS[name](C, stride, False)
        if name in edge.bodies:
            op.body.load_state_dict(edge.bodies[name].state_dict())
        if "pool" in name and sp.pool_bn:
            op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
        classic.append(op.double().train())
    x = torch.randn(4, C, 7, 7, dtype=torch.float64)
    w = torch.softmax(torch.randn(len(sp.ops), dtype=torch.float64), 0)
    ref = sum(wk * op(x) for wk, op in zip(w, classic))
    torch.testing.assert_close(edge(x, w), ref, rtol=1e-10, atol=1e-10)


def _count_calls(edge):
    calls = []
    for name, body in edge.bodies.items():
        body.register_forward_hook(lambda mod, i, o, name=name: calls.append(name))
    return calls


def test_gdas_edge_computes_only_the_sampled_op():
    sp = get_space("darts")
    edge = MixedEdge(4, 1, sp)
    calls = _count_calls(edge)
    x = torch.randn(2, 4, 8, 8)
    for index, op in enumerate(sp.ops):
        calls.clear()
        w = torch.nn.functional.one_hot(torch.tensor(index), len(sp.ops)).float()
        edge(x, w, index)
        assert calls == ([op] if op in edge.bodies else [])
    calls.clear()
    edge(x, torch.full((len(sp.ops),), 1 / len(sp.ops)))
    assert sorted(calls) == sorted(edge.bodies)


def test_gdas_supernet_forward_calls_one_body_per_sampled_conv_edge():
    from ktnas.engine.algorithms import gumbel_arch

    m = tiny("darts")
    calls = []
    for edge in (e for c in m.cells for e in c.edges):
        calls += [_count_calls(edge)]
    arch = gumbel_arch(m, 1.0, torch.Generator().manual_seed(0))
    m(torch.randn(2, 16, 16, 16), arch)
    for cell in m.cells:
        idx = arch["reduce" if cell.reduction else "normal"][1]
        for e, edge in enumerate(cell.edges):
            op = m.space.ops[idx[e]]
            assert calls.pop(0) == ([op] if op in edge.bodies else [])


def test_partial_channels_use_one_kth():
    m = tiny("darts", k=4, edge_norm=True, channels=8)
    edge = m.cells[0].edges[0]
    assert edge.bodies["sep_conv_3x3"][0].in_channels == 2  # 8 channels / K=4
    seen = []
    edge.bodies["dil_conv_3x3"].register_forward_hook(lambda mod, i, o: seen.append(i[0].shape[1]))
    assert m(torch.randn(2, 16, 16, 16)).shape == (2, 5)
    assert seen == [2]
    with pytest.raises(KtnasError, match="divisible"):
        tiny("darts", k=4, channels=6)


def test_mixed_op_dispatch(monkeypatch):
    x, w = torch.randn(2, 4, 5, 5), torch.softmax(torch.randn(3), 0)
    ops = ("none", "skip_connect", "avg_pool_3x3")
    assert mixed_op(x, w, {}, ops, 1, pool_bn=False, impl="torch").shape == x.shape
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors and no interpreter: the kernels cannot run
    with pytest.raises(KernelError, match="needs a CUDA device.*use --kernels torch") as e:
        mixed_op(x, w, {}, ops, 1, pool_bn=False, impl="triton")
    assert "\n" not in str(e.value)
    monkeypatch.setenv("KTNAS_KERNELS", "triton")
    with pytest.raises(KernelError, match="needs a CUDA device"):
        mixed_op(x, w, {}, ops, 1, pool_bn=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(KernelError, match="not torch.float64.*use --kernels torch"):
        mixed_op(x.double(), w, {}, ops, 1, pool_bn=False, variant="gdas", index=1)
    monkeypatch.delenv("KTNAS_KERNELS")
    # auto: the reference on CPU tensors, whatever the interpreter (Triton is the default on CUDA tensors only)
    assert resolve_impl("auto", "cpu") == "torch" and resolve_impl("auto", "cpu", torch.float32) == "torch"
    monkeypatch.setenv("KTNAS_KERNELS", "torch")
    assert resolve_impl("auto", "cuda") == "torch"
    with pytest.raises(KernelError, match="variant"):
        mixed_op(x, w, {}, ops, 1, pool_bn=False, variant="fast", impl="torch")


@pytest.mark.parametrize("variant", ["full", "pc", "gdas"])
@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_search_step_with_triton_kernels_equals_torch(space, variant):
    """One supernet step with the fused kernels (interpreted on the CPU) gives the reference's loss and
    gradients (weights and alphas): the full mixed op, PC-DARTS' partial channels, GDAS' sampled ops."""
    from ktnas.kernels import triton_mixed
    from ktnas.engine.algorithms import gumbel_arch

    if not triton_mixed.available("cpu"):
        pytest.skip("triton interpreter not active in this process")
    torch.manual_seed(0)
    k = 2 if variant == "pc" else 1
    # edges of 4 channels in both spaces (the interpreter runs one program per channel and tile): DARTS one
    # reduction cell (strides 1 and 2), which doubles its 2 channels
    nets = {kn: Supernet(space, 3, 5, stem="cached", layers=1, channels=2 if space == "darts" else 4,
                         reductions=(0,) if space == "darts" else (), k=k, edge_norm=variant == "pc", kernels=kn)
            for kn in ("torch", "triton")}
    with torch.no_grad():  # GDAS: rarely sample 'none', so the loss depends on the alphas
        for a in nets["torch"].alphas().values():
            a[:, nets["torch"].space.ops.index("none")] -= 5
    nets["triton"].load_state_dict(nets["torch"].state_dict())
    x, y = torch.randn(2, 5, 7, 7), torch.tensor([0, 2])
    grads = {}
    for kn, net in nets.items():
        arch = gumbel_arch(net, 1.0, torch.Generator().manual_seed(1)) if variant == "gdas" else None
        loss = F.cross_entropy(net(x, arch), y)
        loss.backward()
        grads[kn] = (loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], rtol=1e-4, atol=1e-5)
    assert grads["triton"][1].keys() == grads["torch"][1].keys()
    assert any(n.startswith("alpha") and g.abs().sum() > 0 for n, g in grads["torch"][1].items())
    for n, g in grads["torch"][1].items():
        torch.testing.assert_close(grads["triton"][1][n], g, rtol=1e-3, atol=1e-4, msg=n)


@pytest.mark.parametrize("variant", ["full", "pc"])
def test_triton_kernels_under_bf16_autocast(variant):
    """Under bf16 autocast the conv branches give bfloat16 pre-BN outputs while the edge input may stay float32
    (what a --precision bf16 search feeds the kernels): the fused step matches the reference's within bf16
    rounding."""
    from ktnas.kernels import triton_mixed

    if not triton_mixed.available("cpu"):
        pytest.skip("triton interpreter not active in this process")
    torch.manual_seed(0)
    k = 2 if variant == "pc" else 1
    # one reduction cell of 4 channels (2 doubled): the interpreter runs one program per channel and tile
    nets = {kn: Supernet("darts", 3, 5, stem="cached", layers=1, channels=2, reductions=(0,), k=k,
                         edge_norm=variant == "pc", kernels=kn) for kn in ("torch", "triton")}
    nets["triton"].load_state_dict(nets["torch"].state_dict())
    x, y = torch.randn(2, 5, 7, 7), torch.tensor([0, 2])
    res = {}
    for kn, net in nets.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        res[kn] = (loss.detach().float(), net.alpha_reduce.grad.clone(), net.stem[0].weight.grad.clone())
    for a, b in zip(res["triton"], res["torch"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())
