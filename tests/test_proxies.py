"""Each zero-cost proxy against its formula computed by hand (numpy, float64) on a tiny network whose gradients
are written out analytically: x -> 1x1 conv W1 -> ReLU -> linear W2, cross-entropy."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from ktnas.engine.rank.proxies import score


def tiny(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2, bias=False))
    return net.double()


def batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 1, 1, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def weights(net):
    return net[0].weight.detach().numpy()[:, :, 0, 0], net[3].weight.detach().numpy()


def grads(net, x, y):
    """dL/dW1, dL/dW2 of the mean cross-entropy, by hand."""
    W1, W2 = weights(net)
    X = x.numpy()[:, :, 0, 0]
    a = X @ W1.T
    h = np.maximum(a, 0)
    z = h @ W2.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(2)[y.numpy()]) / len(X)
    dh = dz @ W2
    return ((dh * (a > 0)).T @ X), dz.T @ h


def test_grad_norm_and_snip():
    net, (x, y) = tiny(), batch(1)
    W1, W2 = weights(net)
    g1, g2 = grads(net, x, y)
    assert score("grad_norm", net, [(x, y)]) == pytest.approx(np.linalg.norm(g1) + np.linalg.norm(g2), rel=1e-12)
    assert score("snip", net, [(x, y)]) == pytest.approx(np.abs(W1 * g1).sum() + np.abs(W2 * g2).sum(), rel=1e-12)
    assert weights(net)[0] is not W1 and np.array_equal(weights(net)[0], W1)  # the network is left as it was


def test_synflow():
    net, b = tiny(), batch(2)
    A1, A2 = (np.abs(w) for w in weights(net))
    h = A1 @ np.ones(3)  # all-ones input, absolute weights: every unit active
    by_hand = (A2 * h[None, :]).sum() + (A1 * A2.sum(0)[:, None]).sum()
    assert score("synflow", net, [b]) == pytest.approx(by_hand, rel=1e-12)


def test_synflow_drops_batchnorm():
    torch.manual_seed(0)
    with_bn = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4, 2, bias=False))
    without = nn.Sequential(with_bn[0], nn.Identity(), with_bn[2], with_bn[3], with_bn[4])
    b = batch(3)
    assert score("synflow", with_bn, [b]) == score("synflow", without, [b])


def test_jacov():
    net, (x, y) = tiny(), batch(4)
    W1, W2 = weights(net)
    X = x.numpy()[:, :, 0, 0]
    mask = (X @ W1.T) > 0
    J = (mask * W2.sum(0)[None, :]) @ W1  # d(sum of logits)/dx per sample
    v = np.linalg.eigvalsh(np.corrcoef(J))
    k = 1e-5
    by_hand = -np.sum(np.log(np.maximum(v, 0) + k) + 1 / (np.maximum(v, 0) + k))
    assert score("jacov", net, [(x, y)]) == pytest.approx(by_hand, rel=1e-9)


def test_naswot():
    """log|det K_H| on a batch whose codes differ; a batch with two equal codes (K_H singular, log 0) ranks at the
    bottom: the lowest float."""
    net = tiny()
    W1, _ = weights(net)
    for seed, singular in ((11, False), (0, True)):
        x, y = batch(seed, n=4)
        c = ((x.numpy()[:, :, 0, 0] @ W1.T) > 0).astype(float)
        K = c @ c.T + (1 - c) @ (1 - c).T
        by_hand = np.linalg.slogdet(K)[1]
        assert np.isinf(by_hand) == singular
        expected = -np.finfo(np.float64).max if singular else by_hand
        assert score("naswot", net, [(x, y)]) == pytest.approx(expected, rel=1e-12)


def test_zico():
    net = tiny()
    bs = [batch(6), batch(7), batch(8)]
    per = [grads(net, x, y) for x, y in bs]
    by_hand = 0.0
    for layer in range(2):
        G = np.stack([g[layer].reshape(-1) for g in per])
        sd = G.std(0)
        keep = sd != 0
        by_hand += np.log(np.sum(np.abs(G).mean(0)[keep] / sd[keep]))
    assert score("zico", net, bs) == pytest.approx(by_hand, rel=1e-9)
