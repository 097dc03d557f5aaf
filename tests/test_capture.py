"""--capture: the search step compiled (torch.compile, on the CPU here) or captured in a CUDA graph (CUDA only).
Compiled, it gives the plain step's losses, gradients and, for a seeded short search, genotype; GDAS' sample is
a tensor operation of fixed shape with the values and gradients of its one-op form; resume and DDP work with it.
torch.compile runs with the aot_eager backend here: the same tracing (dynamo, AOT autograd) as inductor, which
takes minutes per network on this CPU to generate and build its C++ kernels."""

import contextlib
import types

import numpy as np
import pytest
import torch

from ktnas.cache.errors import KtnasError
from ktnas.engine.algorithms.gdas import gumbel_arch
from ktnas.engine.capture import resolve_capture, root_cause
from ktnas.engine.algorithms import get_algorithm
from ktnas.engine.search import SearchConfig, resolve_config, search
from ktnas.engine.searcher import SearchRun
from ktnas.engine.supernet import Supernet

pytestmark = pytest.mark.usefixtures("one_thread")
BACKEND = "aot_eager"


def _run(algo, capture, order=1, space="darts", recompute="edge"):
    cfg = resolve_config(SearchConfig(features="unused", algo=algo, order=order, space=space, batch_size=4,
                                      epochs=3, layers=2, channels=4, reductions=(1,), device="cpu", kernels="torch",
                                      recompute=recompute, capture=capture, compile_backend=BACKEND))
    torch.manual_seed(0)
    info = dict(in_channels=6, resolution=8, shape=[6, 8, 8], num_classes=10)
    return SearchRun(cfg, torch.device("cpu"), info)


def _steps(run, n=3):
    """Losses of ``n`` search steps on fixed batches and every gradient after the last (weights and alphas)."""
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, 6, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2 * n)]
    gen, rng = torch.Generator().manual_seed(1), np.random.default_rng(1)
    losses = []
    run.model.train()
    with run.stepper(0, gen, rng) as step:
        for i in range(n):
            loss, _ = step(*batches[2 * i], *batches[2 * i + 1])
            losses.append(float(loss))
    params = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    return losses, params


@pytest.mark.parametrize("algo,order", [("darts", 1), ("darts", 2), ("gdas", 1), ("pcdarts", 1)],
                         ids=["darts-1", "darts-2", "gdas", "pcdarts"])
def test_compiled_step_equals_plain(algo, order):
    """Three steps compiled give the plain steps' losses and leave the same weights and alphas."""
    plain_losses, plain = _steps(_run(algo, "none", order))
    run = _run(algo, "compile", order)
    assert run.capture == "compile" and run.net is not run.model
    losses, got = _steps(run)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
    for n in plain:
        torch.testing.assert_close(got[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_gdas_fixed_shape_sample_equals_one_op_sample():
    """GDAS' fixed-shape sample (every op, the unsampled ones weighing exactly 0) against the one-op form, in
    float64: the same loss, the same alpha gradients, the same gradients of the sampled ops' weights, zeros for
    the others."""
    def grads(fixed):
        torch.manual_seed(0)
        m = Supernet("darts", 10, 6, layers=3, channels=4, reductions=(1,), kernels="torch").double()
        arch = gumbel_arch(m, 1.0, torch.Generator().manual_seed(3), fixed=fixed)
        loss = torch.nn.functional.cross_entropy(m(torch.randn(4, 6, 8, 8, dtype=torch.float64,
                                                               generator=torch.Generator().manual_seed(4)), arch),
                                                 torch.arange(4))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters()}

    (l1, g1), (lf, gf) = grads(False), grads(True)
    torch.testing.assert_close(lf, l1, rtol=1e-13, atol=0)
    zero = 0
    for n, g in gf.items():
        assert g is not None, n  # fixed shape: every parameter has a gradient
        if g1[n] is None:
            assert not g.any(), n
            zero += 1
        else:
            torch.testing.assert_close(g, g1[n], rtol=1e-10, atol=1e-14, msg=n)
    assert zero > 5 and gf["alpha_normal"].abs().sum() > 0, zero


def test_gdas_noise_is_finite_without_redraws(monkeypatch):
    """The Gumbel noise is clamped, not drawn again: finite even where the exponential draw is 0."""
    from ktnas.engine.algorithms import gdas

    n = gdas.gumbel_noise((50, 50), torch.Generator().manual_seed(0))
    assert torch.isfinite(n).all() and n.shape == (50, 50) and n.std() > 0.5
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, generator=None: self.zero_())
    n = gdas.gumbel_noise((3, 4), torch.Generator().manual_seed(0))
    assert torch.isfinite(n).all() and n.max() < 100


def test_resolve_capture():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    darts, rnd = get_algorithm("darts"), get_algorithm("random")
    assert resolve_capture("auto", darts, cpu) == "none"
    assert resolve_capture("auto", darts, cuda) == "graph"
    assert resolve_capture("auto", darts, cuda, world_size=2) == "none"
    assert resolve_capture("auto", rnd, cuda) == "none"
    assert resolve_capture("compile", darts, cpu) == "compile"
    with pytest.raises(KtnasError, match="--capture graph records the step in a CUDA graph: this search runs on cpu"):
        resolve_capture("graph", darts, cpu)
    with pytest.raises(KtnasError, match="--capture compile with --algo random: random search draws"):
        resolve_capture("compile", rnd, cpu)
    with pytest.raises(KtnasError, match="under torchrun"):
        resolve_capture("graph", darts, cuda, world_size=2)
    with pytest.raises(KtnasError, match="unknown --capture 'cuda'"):
        resolve_config(SearchConfig(features="s", capture="cuda"))


def test_capture_failure_reason_names_the_first_error():
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore details")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as e:
        assert root_cause(e) == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    assert root_cause(ValueError()) == "ValueError"


def _search(store, out, **kw):
    base = dict(features=str(store), epochs=2, batch_size=16, limit=64, layers=2, channels=4, reductions=(1,),
                device="cpu", progress=False, compile_backend=BACKEND)
    return search(SearchConfig(out=str(out), **dict(base, **kw)))


@pytest.mark.parametrize("algo", ["darts", "gdas"])
def test_seeded_search_compiled_same_genotype(search_store, tmp_path, algo):
    """A seeded two-epoch search compiled finds the plain search's genotype and losses."""
    plain = _search(search_store, tmp_path / "plain", algo=algo, capture="none")
    comp = _search(search_store, tmp_path / "comp", algo=algo, capture="compile")
    assert comp["genotype"] == plain["genotype"]
    for key in ("train_loss", "val_loss", "val_acc"):
        assert comp["last"][key] == pytest.approx(plain["last"][key], rel=1e-5), key


def test_compiled_search_resumes(search_store, tmp_path, monkeypatch):
    """Killed after its first epoch and resumed with --capture compile, a search ends as the uninterrupted one
    (which ran without capture: the capture mode may change on resume)."""
    import ktnas.engine.searcher as S

    whole = _search(search_store, tmp_path / "whole", capture="none")
    real, calls = S.SearchRun.train_epoch, []

    def killed(self, epoch, *a):
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch, *a)

    monkeypatch.setattr(S.SearchRun, "train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        _search(search_store, tmp_path / "cut", capture="compile")
    monkeypatch.setattr(S.SearchRun, "train_epoch", real)
    resumed = _search(search_store, tmp_path / "cut", capture="compile", resume=True)
    assert resumed["genotype"] == whole["genotype"]
    assert resumed["last"]["val_loss"] == pytest.approx(whole["last"]["val_loss"], rel=1e-5)


def test_graph_step_warms_up_captures_once_then_replays(monkeypatch):
    """GraphStep's order of work, with CUDA's stream and graph primitives stood in for (no GPU here): the epoch's
    first GRAPH_WARMUP steps run eagerly on the side stream, the next is captured on static copies of its batch and
    replayed, later full batches only replay (their data copied into the static buffers), a batch of another
    shape runs eagerly; close frees the graph."""
    from ktnas.engine import capture as C

    log = []

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def ctx(tag):
        log.append(f"enter {tag}")
        yield
        log.append(f"exit {tag}")

    monkeypatch.setattr(C.torch.cuda, "Stream", lambda device: types.SimpleNamespace(wait_stream=lambda s: None))
    monkeypatch.setattr(C.torch.cuda, "current_stream", lambda device: types.SimpleNamespace(wait_stream=lambda s: None))
    monkeypatch.setattr(C.torch.cuda, "stream", lambda s: ctx("side"))
    monkeypatch.setattr(C.torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(C.torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(C.torch.cuda, "graph", lambda g, capture_error_mode: ctx("capture"))

    def step(x, y):
        log.append(("step", float(x.sum()), tuple(x.shape)))
        return x * 2, y

    run = types.SimpleNamespace(device=torch.device("cpu"))
    g = C.GraphStep(run, step)
    batches = [(torch.full((2, 3), float(i)), torch.tensor([i, i])) for i in range(6)]
    outs = [g(*b) for b in batches[:C.GRAPH_WARMUP + 2]]
    assert log[:3 * C.GRAPH_WARMUP] == [x for i in range(C.GRAPH_WARMUP)
                                        for x in ("enter side", ("step", 6.0 * i, (2, 3)), "exit side")]
    k = C.GRAPH_WARMUP
    assert log[3 * k:] == ["enter capture", ("step", 6.0 * k, (2, 3)), "exit capture", "replay", "replay"]
    assert outs[-1][0] is outs[-2][0]  # a replay returns the captured outputs, refilled
    torch.testing.assert_close(g.static[0], batches[k + 1][0])  # the last batch copied into the static buffer
    log.clear()
    g(torch.ones(1, 3), torch.tensor([0]))  # a smaller last batch: eager
    assert log == [("step", 3.0, (1, 3))]
    g.close()
    assert g.graph is None and g.static is None
