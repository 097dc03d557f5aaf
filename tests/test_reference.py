"""The PyTorch reference of the fused mixed op equals the classic DARTS / GDAS / PC-DARTS mixed ops it replaces."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ktnas.engine.ops import OPS
from ktnas.engine.spaces import DARTS_OPS, NB201_OPS
from ktnas.kernels import edge_relu, mixed_op_reference, mixed_op_reference_gdas, mixed_op_reference_pc
from ktnas.kernels.reference import is_conv_branch

SPACE_OPS = {"darts": (DARTS_OPS, True), "nb201": (NB201_OPS, False)}  # ops, pool_bn


pytestmark = pytest.mark.usefixtures("one_thread")


def classic_ops(ops, C, stride, pool_bn):
    """DARTS' MixedOp modules: every op a full nn.Module, pools followed by BatchNorm2d(affine=False) in DARTS."""
    mods = []
    for name in ops:
        op = OPS[name](C, stride, False)
        if "pool" in name and pool_bn:
            op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
        mods.append(op)
    return nn.ModuleList(mods).double()


def conv_outs_of(mods, ops, x, stride):
    """The pre-BN outputs of the conv branches, sharing the classic modules' parameters and one ReLU."""
    r = edge_relu(x)
    return {n: m.body(r) for n, m in zip(ops, mods) if is_conv_branch(n, stride)}


def _cases():
    rng = np.random.default_rng(0)
    cases = [(space, tuple(SPACE_OPS[space][0])) for space in SPACE_OPS]
    for space in [*SPACE_OPS] * 3:  # random subsets, in random order
        ops = SPACE_OPS[space][0]
        cases.append((space, tuple(rng.permutation(ops)[:rng.integers(1, len(ops) + 1)].tolist())))
    return cases


@pytest.mark.parametrize("space,ops", _cases())
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(1, 6, 7, 7), (3, 5, 9, 7)])
def test_equals_classic_mixed_op(space, ops, stride, shape):
    torch.manual_seed(1)
    pool_bn = SPACE_OPS[space][1]
    mods = classic_ops(ops, shape[1], stride, pool_bn)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(len(ops), dtype=torch.float64), 0).requires_grad_()
    g = torch.randn(shape[0], shape[1], -(-shape[2] // stride), -(-shape[3] // stride), dtype=torch.float64)

    want = sum(wk * m(x) for wk, m in zip(w, mods))
    grads_want = torch.autograd.grad((want * g).sum(), [x, w, *mods.parameters()], allow_unused=True)
    out = mixed_op_reference(x, w, conv_outs_of(mods, ops, x, stride), ops, stride, pool_bn=pool_bn)
    grads = torch.autograd.grad((out * g).sum(), [x, w, *mods.parameters()], allow_unused=True)

    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for a, b, t in zip(grads, grads_want, [x, w, *mods.parameters()]):
        zero = torch.zeros_like(t)  # unused inputs ('none' alone does not read x) have no gradient: zero
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_gradcheck(space, stride):
    ops, pool_bn = SPACE_OPS[space]
    torch.manual_seed(2)
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(len(ops), dtype=torch.float64, requires_grad=True)
    names = [n for n in ops if is_conv_branch(n, stride)]
    convs = [torch.randn(2, 2, -(-4 // stride), -(-5 // stride), dtype=torch.float64, requires_grad=True)
             for _ in names]

    def f(x, w, *convs):
        return mixed_op_reference(x, w, dict(zip(names, convs)), ops, stride, pool_bn=pool_bn)

    assert torch.autograd.gradcheck(f, (x, w, *convs), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_gdas(stride):
    torch.manual_seed(3)
    C, ops = 6, DARTS_OPS
    mods = classic_ops(ops, C, stride, True)
    x = torch.randn(2, C, 7, 9, dtype=torch.float64)
    logits = torch.randn(len(ops), dtype=torch.float64, requires_grad=True)
    for index, name in enumerate(ops):
        probs = torch.softmax(logits / 0.5, 0)
        hard = F.one_hot(torch.tensor(index), len(ops)).double() - probs.detach() + probs
        conv_outs = {n: v for n, v in conv_outs_of(mods, ops, x, stride).items() if n == name}
        out = mixed_op_reference_gdas(x, hard, conv_outs, ops, stride, index=index)
        torch.testing.assert_close(out, hard[index] * mods[index](x), rtol=1e-10, atol=1e-10)
        if name == "none":
            assert not out.any()
            continue
        logits.grad = None
        (out * torch.randn_like(out)).sum().backward()
        assert (logits.grad != 0).all(), name  # straight-through: every logit gets a gradient


def pc_channel_shuffle(x, groups):
    """PC-DARTS' channel_shuffle, as written there."""
    batchsize, num_channels, height, width = x.data.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class PCMixedOp(nn.Module):
    """PC-DARTS' MixedOp (model_search.py), with k a parameter and ceil_mode on the bypass pool for odd sizes
    (identical to the original for even sizes, where the original works)."""

    def __init__(self, C, stride, ops, k):
        super().__init__()
        self.k = k
        self.mp = nn.MaxPool2d(2, 2, ceil_mode=True)
        self._ops = classic_ops(ops, C // k, stride, True)

    def forward(self, x, weights):
        dim_2 = x.shape[1]
        xtemp = x[:, :dim_2 // self.k, :, :]
        xtemp2 = x[:, dim_2 // self.k:, :, :]
        temp1 = sum(w * op(xtemp) for w, op in zip(weights, self._ops))
        if temp1.shape[2] == x.shape[2]:
            ans = torch.cat([temp1, xtemp2], dim=1)
        else:
            ans = torch.cat([temp1, self.mp(xtemp2)], dim=1)
        return pc_channel_shuffle(ans, self.k)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("C,k,hw", [(12, 4, (8, 8)), (12, 4, (7, 9)), (6, 2, (9, 9))])
def test_pc(stride, C, k, hw):
    torch.manual_seed(4)
    pc = PCMixedOp(C, stride, DARTS_OPS, k)
    x = torch.randn(3, C, *hw, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(len(DARTS_OPS), dtype=torch.float64), 0).requires_grad_()
    want = pc(x, w)
    out = mixed_op_reference_pc(x, w, conv_outs_of(pc._ops, DARTS_OPS, x[:, :C // k], stride), DARTS_OPS, stride,
                                k=k)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), [x, w]), torch.autograd.grad((want * g).sum(), [x, w])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
def test_low_precision_close_to_float64(dtype, tol, stride):
    torch.manual_seed(5)
    ops = DARTS_OPS
    x = torch.randn(3, 6, 9, 7, dtype=torch.float64)
    w = torch.softmax(torch.randn(len(ops), dtype=torch.float64), 0)
    shape = (3, 6, -(-9 // stride), -(-7 // stride))
    convs = {n: torch.randn(shape, dtype=torch.float64) * 3 + 1 for n in ops if is_conv_branch(n, stride)}
    want = mixed_op_reference(x, w, convs, ops, stride)
    out = mixed_op_reference(x.to(dtype), w.to(dtype), {n: v.to(dtype) for n, v in convs.items()}, ops, stride)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    pc = mixed_op_reference_pc(x[:, :4].to(dtype), w[:3].to(dtype), {}, ("none", "max_pool_3x3", "avg_pool_3x3"),
                               stride, k=2)
    assert pc.dtype == dtype and pc.shape == (3, 4, *shape[2:])


def test_contract_errors():
    x = torch.randn(2, 4, 5, 5)
    w = torch.ones(2)
    with pytest.raises(ValueError, match="lacks the pre-BN output of conv branch 'sep_conv_3x3'"):
        mixed_op_reference(x, w, {}, ("none", "sep_conv_3x3"), 1)
    with pytest.raises(ValueError, match="lacks the pre-BN output of conv branch 'skip_connect'"):
        mixed_op_reference(x, w, {}, ("none", "skip_connect"), 2)
    with pytest.raises(ValueError, match="expected"):
        mixed_op_reference(x, w, {"sep_conv_3x3": torch.randn(2, 4, 5, 5)}, ("none", "sep_conv_3x3"), 2)
    with pytest.raises(ValueError, match="weights"):
        mixed_op_reference(x, torch.ones(3), {}, ("none", "skip_connect"), 1)
    with pytest.raises(ValueError, match="divisible"):
        mixed_op_reference_pc(x, w, {}, ("none", "skip_connect"), 1, k=3)
