"""--recompute: each mixed edge (or each cell) keeps only its inputs and recomputes the rest in backward. The same
losses and gradients as the plain step (every space, the GDAS and PC-DARTS forms), the same genotype for a seeded
search, far less kept for backward; the profile's memory targets (tests/test_bench_step.py) build on it."""

import pytest
import torch

from ktnas.cache.errors import KtnasError
from ktnas.engine.algorithms.gdas import gumbel_arch
from ktnas.engine.search.loop import SearchConfig, resolve_config, search
from ktnas.engine.search.supernet import Supernet

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(space, recompute, k=1, edge_norm=False, gdas=False):
    torch.manual_seed(0)
    m = Supernet(space, 10, 6, layers=3, channels=8, reductions=(1,) if space == "darts" else (1,), k=k,
                 edge_norm=edge_norm, kernels="torch", recompute=recompute).double()
    x = torch.randn(4, 6, 9, 9, dtype=torch.float64, requires_grad=True)
    arch = gumbel_arch(m, 1.0, torch.Generator().manual_seed(1)) if gdas else None
    loss = torch.nn.functional.cross_entropy(m(x, arch), torch.arange(4))
    loss.backward()
    return loss.detach(), x.grad, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("space,k,edge_norm,gdas", [("darts", 1, False, False), ("nb201", 1, False, False),
                                                     ("darts", 4, True, False), ("darts", 1, False, True)],
                         ids=["darts", "nb201", "pcdarts", "gdas"])
@pytest.mark.parametrize("recompute", ["edge", "cell"])
def test_same_loss_and_gradients(space, k, edge_norm, gdas, recompute):
    ref = _grads(space, "none", k, edge_norm, gdas)
    got = _grads(space, recompute, k, edge_norm, gdas)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-14)
    assert got[2].keys() == ref[2].keys() and len(ref[2]) > 10
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-10, atol=1e-14, msg=n)


def test_recompute_keeps_less_for_backward():
    """Bytes autograd keeps after the forward (parameters excluded): an edge keeps its input only."""
    from ktnas.engine.profile.instruments import saved_for_backward

    kept = {}
    for rec in ("none", "cell", "edge"):
        torch.manual_seed(0)
        m = Supernet("darts", 10, 6, layers=3, channels=8, reductions=(1,), kernels="torch", recompute=rec)
        with saved_for_backward(exclude=list(m.parameters())) as s:
            m(torch.randn(8, 6, 12, 12)).sum()
        kept[rec] = s["bytes"]
    assert kept["edge"] < kept["none"] / 5, kept
    assert kept["cell"] < kept["none"] / 2, kept


def test_default_and_refusal():
    base = dict(features="s", batch_size=8, device="cpu")
    assert resolve_config(SearchConfig(**base)).recompute == "none"  # the CPU: recomputing costs time, not needed
    assert resolve_config(SearchConfig(**dict(base, device="cuda"))).recompute == "edge"
    assert resolve_config(SearchConfig(stem="none", dataset="fashion-mnist", batch_size=8)).recompute == "none"
    with pytest.raises(KtnasError, match="unknown --recompute 'all'"):
        resolve_config(SearchConfig(**base, recompute="all"))


def test_seeded_search_same_genotype(search_store, tmp_path):
    """A seeded two-epoch search recomputing edges finds the genotype and the losses of the plain one."""
    kw = dict(features=str(search_store), epochs=2, batch_size=16, limit=64, layers=2, channels=4,
              reductions=(1,), device="cpu", progress=False)
    plain = search(SearchConfig(out=str(tmp_path / "none"), recompute="none", **kw))
    edge = search(SearchConfig(out=str(tmp_path / "edge"), recompute="edge", **kw))
    assert edge["genotype"] == plain["genotype"]
    for key in ("train_loss", "val_loss", "val_acc"):
        assert edge["last"][key] == pytest.approx(plain["last"][key], rel=1e-5), key


def test_profile_tracker_sees_what_the_allocator_sees_under_recompute():
    """The step profile's tracker against the CPU allocator's own record, on a real step that recomputes edges
    (FLOPs are counted by the tracker itself: FlopCounterMode's module hooks would keep the recomputed tensors)."""
    from ktnas.engine.profile.instruments import StepTracker, cpu_allocator_peak

    torch.manual_seed(0)
    m = Supernet("darts", 10, 6, layers=3, channels=8, reductions=(1,), kernels="torch", recompute="edge")
    x, y = torch.randn(8, 6, 12, 12), torch.randint(0, 10, (8,))

    def step():
        torch.nn.functional.cross_entropy(m(x), y).backward()

    step()
    truth = cpu_allocator_peak(step)
    tr = StepTracker(round_to=1)
    with tr:
        tr.track(*m.parameters(), *[p.grad for p in m.parameters()], x, y)
        base = tr.current
        tr.reset_peak()
        with tr.count():
            step()
    assert abs((tr.peak - base) / truth - 1) < 0.05, (tr.peak - base, truth)
    assert sum(tr.flops.values()) > 0 and any("convolution" in k for k in tr.flops)


def test_deep_copy_recomputes_with_its_own_weights():
    """A deep copy of a recomputing supernet computes with the copy's weights, not the original's."""
    import copy

    torch.manual_seed(0)
    m = Supernet("darts", 10, 6, layers=2, channels=4, reductions=(1,), kernels="torch", recompute="edge")
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for p in twin.weight_parameters():
            p.mul_(0.5)
    x = torch.randn(4, 6, 8, 8)
    fresh = Supernet("darts", 10, 6, layers=2, channels=4, reductions=(1,), kernels="torch", recompute="none")
    fresh.load_state_dict(twin.state_dict())
    torch.testing.assert_close(twin(x), fresh(x))
    assert not torch.allclose(twin(x), m(x))
