"""Evaluation networks at every feature size the search accepts, odd ones included (7..34): a search that ran
on a store must be trainable (NB201's reduction block pooled without ceil_mode and broke at odd sizes)."""

import pytest
import torch
import torch.nn as nn

from ktnas.engine.train.network import build_network
from ktnas.engine.spaces import get_space

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_evaluation_network_at_every_size(space):
    """Forward and backward at every input size 7..34 on a small network with two reductions."""
    g = get_space(space).random_genotype(__import__("numpy").random.default_rng(0))
    for size in range(7, 35):
        torch.manual_seed(size)
        net = build_network(g, 10, layers=4 if space == "darts" else 5, channels=4, reductions=(1, 3) if space ==
                            "darts" else (1, 3), in_channels=6, in_size=size)
        net.train()
        logits, _ = net(torch.randn(2, 6, size, size))
        assert logits.shape == (2, 10), size
        logits.sum().backward()
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad), size


def test_nb201_reduction_rounds_odd_sizes_up_like_its_strided_conv():
    """NB201's ResNet block at an odd size: both branches ceil(H/2); at even sizes the pool is unchanged."""
    from ktnas.engine.spaces.nb201 import ResNetBasicBlock

    blk = ResNetBasicBlock(4, 8, ceil_mode=True)
    assert blk(torch.randn(1, 4, 17, 17)).shape == (1, 8, 9, 9)
    x = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(blk.downsample[0](x), torch.nn.functional.avg_pool2d(x, 2, 2))


def _darts_auxiliary_head(C, num_classes):
    """DARTS' AuxiliaryHeadCIFAR as its paper's code defines it (cnn/model.py), for an 8x8 input."""
    features = nn.Sequential(
        nn.ReLU(), nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False), nn.Conv2d(C, 128, 1, bias=False),
        nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU())
    head = nn.Module()
    head.features, head.classifier = features, nn.Linear(768, num_classes)
    head.forward = lambda x: head.classifier(head.features(x).flatten(1))
    return head


@pytest.mark.parametrize("train", [True, False])
def test_auxiliary_head_equals_darts_on_8x8(train):
    """ktnas's auxiliary head is DARTS' on the 8x8 maps it sees in DARTS' networks (float64, same weights); other
    sizes pool adaptively to 2x2 (DARTS' head cannot take them)."""
    from ktnas.engine.ops import AuxiliaryHead

    torch.manual_seed(0)
    ours, theirs = AuxiliaryHead(24, 10).double(), _darts_auxiliary_head(24, 10).double()
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics that are not the defaults, so eval mode is tested too
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    theirs.load_state_dict(ours.state_dict())
    ours.train(train), theirs.train(train)
    x = torch.randn(4, 24, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    adaptive = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(2))(x)
    assert not torch.allclose(adaptive, theirs.features[:2](x))  # the pooling this replaced differs from DARTS'
    assert ours(torch.randn(2, 24, 5, 5, dtype=torch.float64)).shape == (2, 10)
