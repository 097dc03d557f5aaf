"""Evaluation networks at every feature size the search accepts, odd ones included (7..34): a search that ran
on a store must be trainable (NB201's reduction block pooled without ceil_mode and broke at odd sizes)."""

import pytest
import torch

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
