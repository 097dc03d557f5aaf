"""--capture: the search step compiled (torch.compile, on the CPU here) or captured in a CUDA graph (CUDA only).
Compiled, it gives the plain step's losses, gradients and, for a seeded short search, genotype; GDAS' sample is
a tensor operation of fixed shape with the values and gradients of its one-op form; resume and DDP work with it.
torch.compile runs with the aot_eager backend here: the same tracing (dynamo, AOT autograd) as inductor, which
takes minutes per network on this CPU to generate and build its C++ kernels."""

import contextlib
import sys
import types

import numpy as np
import pytest
import torch

from conftest import interrupt_search_at
from ktnas.cache.errors import KtnasError
from ktnas.engine.algorithms.gdas import gumbel_arch
from ktnas.engine.search.capture import resolve_capture, root_cause
from ktnas.engine.algorithms import get_algorithm
from ktnas.engine.search.loop import SearchConfig, resolve_config, search
from ktnas.engine.search.run import SearchRun
from ktnas.engine.search.supernet import Supernet

pytestmark = pytest.mark.usefixtures("one_thread")
BACKEND = "aot_eager"


def _run(algo, capture, order=1, space="darts", recompute="edge"):
    # one reduction cell: its edges run at both strides, every op, at half the tracing of a normal + reduce pair
    cfg = resolve_config(SearchConfig(features="unused", algo=algo, options=dict(order=order) if order != 1 else {},
                                      space=space, batch_size=4,
                                      epochs=3, layers=1, channels=4, reductions=(0,), device="cpu", kernels="torch",
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
    one_cell = dict(layers=1, reductions=(0,))  # a reduction cell: both strides, every op, half the tracing
    plain = _search(search_store, tmp_path / "plain", algo=algo, capture="none", **one_cell)
    comp = _search(search_store, tmp_path / "comp", algo=algo, capture="compile", **one_cell)
    assert comp["genotype"] == plain["genotype"]
    for key in ("train_loss", "val_loss", "val_acc"):
        assert comp["last"][key] == pytest.approx(plain["last"][key], rel=1e-5), key


def _killed_then_resumed(store, out, monkeypatch, **kw):
    """A search killed after its first epoch (KeyboardInterrupt), then resumed in the same folder: its summary."""
    undo = interrupt_search_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _search(store, out, **kw)
    undo()
    return _search(store, out, resume=True, **kw)


def test_compiled_search_resumes(search_store, tmp_path, monkeypatch):
    """Killed after its first epoch and resumed with --capture compile, a search ends as the uninterrupted one
    (which ran without capture: the capture mode may change on resume)."""
    one_cell = dict(layers=1, reductions=(0,))
    whole = _search(search_store, tmp_path / "whole", capture="none", **one_cell)
    resumed = _killed_then_resumed(search_store, tmp_path / "cut", monkeypatch, capture="compile", **one_cell)
    assert resumed["genotype"] == whole["genotype"]
    assert resumed["last"]["val_loss"] == pytest.approx(whole["last"]["val_loss"], rel=1e-5)


def _stand_in_cuda(monkeypatch, log=None, graph_ctx=None):
    """CUDA's stream, synchronisation and graph primitives stood in for (no GPU here); ``graph_ctx(graph)``: the
    capture context (default: logs 'enter capture' / 'exit capture')."""
    from ktnas.engine.search import capture as C

    log = [] if log is None else log

    @contextlib.contextmanager
    def ctx(tag):
        log.append(f"enter {tag}")
        yield
        log.append(f"exit {tag}")

    monkeypatch.setattr(C.torch.cuda, "Stream", lambda device: types.SimpleNamespace(wait_stream=lambda s: None))
    stream = types.SimpleNamespace(wait_stream=lambda s: None)
    monkeypatch.setattr(C.torch.cuda, "current_stream", lambda device: stream)
    monkeypatch.setattr(C.torch.cuda, "stream", lambda s: ctx("side"))
    monkeypatch.setattr(C.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(C.torch.cuda, "graph", graph_ctx or (lambda g, capture_error_mode: ctx("capture")))
    return log


def test_graph_step_warms_up_captures_once_then_replays(monkeypatch):
    """GraphStep's order of work, with CUDA's primitives stood in for: the epoch's first GRAPH_WARMUP steps run
    eagerly on the side stream, the next is captured on static copies of its batch and replayed, later full batches
    only replay (their data copied into the static buffers), a batch of another shape runs eagerly; close frees the
    graph. Every gradient is None when the capture begins (the warm-up's are not written by the graph)."""
    from ktnas.engine.search import capture as C

    class Graph:
        def replay(self):
            log.append("replay")

    model = torch.nn.Linear(3, 2)
    log = []
    _stand_in_cuda(monkeypatch, log, lambda g, capture_error_mode: _grads_at_capture(log, model))
    monkeypatch.setattr(C.torch.cuda, "CUDAGraph", Graph)

    def step(x, y):
        log.append(("step", float(x.sum()), tuple(x.shape)))
        model(x).sum().backward()  # a step leaves gradients behind
        return x * 2, y

    g = C.GraphStep(types.SimpleNamespace(device=torch.device("cpu"), model=model), step)
    batches = [(torch.full((2, 3), float(i)), torch.tensor([i, i])) for i in range(6)]
    outs = [g(*b) for b in batches[:C.GRAPH_WARMUP + 2]]
    assert log[:3 * C.GRAPH_WARMUP] == [x for i in range(C.GRAPH_WARMUP)
                                        for x in ("enter side", ("step", 6.0 * i, (2, 3)), "exit side")]
    k = C.GRAPH_WARMUP
    assert log[3 * k:] == ["enter capture (grads: none)", ("step", 6.0 * k, (2, 3)), "exit capture", "replay",
                           "replay"]
    assert outs[-1][0] is outs[-2][0]  # a replay returns the captured outputs, refilled
    torch.testing.assert_close(g.static[0], batches[k + 1][0])  # the last batch copied into the static buffer
    log.clear()
    g(torch.ones(1, 3), torch.tensor([0]))  # a smaller last batch: eager
    assert log == [("step", 3.0, (1, 3))]
    assert g.report() == dict(mode="graph", replays=2, called=k + 1)
    g.close()
    assert g.graph is None and g.static is None


@contextlib.contextmanager
def _grads_at_capture(log, model):
    log.append("enter capture (grads: " + ("none" if all(p.grad is None for p in model.parameters()) else "kept") + ")")
    yield
    log.append("exit capture")


def test_failed_capture_runs_the_step_eagerly(monkeypatch):
    """A capture that raises does not end the epoch: one CaptureFallback warning naming the first error, the
    batch runs eagerly on its own data (gradients cleared first), later batches too, and no capture is tried
    again."""
    from ktnas.engine.search import capture as C

    attempts = []

    @contextlib.contextmanager
    def failing(g, capture_error_mode):
        attempts.append(1)
        yield
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\ndetails")

    _stand_in_cuda(monkeypatch, graph_ctx=failing)
    monkeypatch.setattr(C.torch.cuda, "CUDAGraph", lambda: object())
    model = torch.nn.Linear(3, 2)
    grads_seen = []

    def step(x):
        grads_seen.append(model.weight.grad is None)
        model(x).sum().backward()
        return x * 2

    g = C.GraphStep(types.SimpleNamespace(device=torch.device("cpu"), model=model), step, warmup=1)
    xs = [torch.full((2, 3), float(i)) for i in range(4)]
    assert g(xs[0]) is not None
    with pytest.warns(C.CaptureFallback, match="could not be captured in a CUDA graph .RuntimeError: CUDA error: "
                                               "operation not permitted when stream is capturing.; running it eagerly"):
        out = g(xs[1])
    torch.testing.assert_close(out, xs[1] * 2)  # the batch itself, not the static copy's (discarded) result
    assert grads_seen[-1]  # the failed capture's gradients were cleared before the eager rerun
    for x in xs[2:]:
        torch.testing.assert_close(g(x), x * 2)
    assert len(attempts) == 1 and g.graph is None
    assert g.report() == dict(mode="eager (capture failed: RuntimeError: CUDA error: operation not permitted when "
                                   "stream is capturing)", replays=0, called=4)


def test_set_capturable_moves_adams_step_beside_its_parameter(monkeypatch):
    """A resumed run loads Adam's state on the CPU; a captured step needs each ``step`` beside its parameter.
    Parameters on the meta device stand for the GPU's (Adam's own device check made to accept it)."""
    from ktnas.engine.search.capture import set_capturable

    monkeypatch.setattr(sys.modules["torch.optim.adam"], "_get_capturable_supported_devices", lambda *a, **k: ["meta"])
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = torch.optim.Adam([p], lr=1e-3, foreach=False)
    opt.load_state_dict({"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.zeros(3),
                                       "exp_avg_sq": torch.zeros(3)}},
                         "param_groups": [dict(opt.param_groups[0], params=[0])]})
    assert opt.state[p]["step"].device.type == "cpu"  # as a checkpoint loaded with map_location="cpu" leaves it
    p.grad = torch.empty(3, device="meta")
    set_capturable(opt, True)
    assert opt.state[p]["step"].device.type == "meta" and opt.state[p]["step"].dtype == torch.float32
    opt.step()  # before the fix: "params and state_steps must be on supported devices"
    set_capturable(opt, False)
    assert not opt.param_groups[0]["capturable"]


# ------------------------------------------------------------------ whole searches with CUDA graphs emulated
def _emulated_graphs(monkeypatch):
    """``--capture graph`` on the CPU: CUDA's primitives stood in for so that a capture runs the step once (the
    batch it records) and every later replay runs it again on the static inputs, refilling the captured outputs:
    each batch's step runs once, as on a GPU. Adam's capturable path is allowed on the CPU."""
    from ktnas.engine.search import capture as C
    from ktnas.engine.search import loop as S
    from ktnas.engine.search import run as searcher

    _stand_in_cuda(monkeypatch)
    live = {}
    init = C.GraphStep.__init__

    def remember(self, *a, **kw):
        init(self, *a, **kw)
        live["step"] = self

    class Graph:
        def __init__(self):
            self.owner, self.first = live["step"], True

        def replay(self):
            if self.first:  # the capture ran this batch already
                self.first = False
                return
            out = self.owner.step(*self.owner.static)
            for dst, src in zip(_tensors(self.owner.out), _tensors(out)):
                dst.copy_(src)

    monkeypatch.setattr(C.GraphStep, "__init__", remember)
    monkeypatch.setattr(C.torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(sys.modules["torch.optim.adam"], "_get_capturable_supported_devices",
                        lambda *a, **k: ["cuda", "cpu"])
    force = lambda capture, *a, **kw: capture if capture in ("graph", "none") else resolve_capture(capture, *a, **kw)
    monkeypatch.setattr(S, "resolve_capture", force)
    monkeypatch.setattr(searcher, "resolve_capture", force)


def _tensors(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


def test_emulated_graph_search_equals_plain_and_resumes(search_store, tmp_path, monkeypatch):
    """With CUDA graphs emulated, a seeded search captured (steps and validation passes) finds the plain search's
    genotype and losses, and records how it ran; killed after its first epoch and resumed captured (Adam's state
    loaded on the CPU, then made capturable), it ends as the uninterrupted one. At the paper's architecture rate:
    Adam's capturable update differs from the plain one in the last bits, which a rate scaled up for these 8 steps
    turns into another argmax."""
    import json

    plain = _search(search_store, tmp_path / "plain", capture="none", epochs=2, batch_size=8, schedule="paper")
    _emulated_graphs(monkeypatch)
    whole = _search(search_store, tmp_path / "whole", capture="graph", epochs=2, batch_size=8, schedule="paper")
    assert whole["genotype"] == plain["genotype"]
    for key in ("train_loss", "val_loss", "val_acc"):
        assert whole["last"][key] == pytest.approx(plain["last"][key], rel=1e-5), key
    rec = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["steps"] == dict(mode="graph", replays=1, called=3)  # 4 steps: 3 warm-up, 1 captured
    assert rec["eval"]["mode"] == "graph" and rec["eval"]["replays"] == 1
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["ran"]["steps"]["mode"] == "graph"

    resumed = _killed_then_resumed(search_store, tmp_path / "cut", monkeypatch, capture="graph", epochs=2,
                                   batch_size=8, schedule="paper")
    assert resumed["genotype"] == whole["genotype"]
    assert resumed["last"]["val_loss"] == pytest.approx(whole["last"]["val_loss"], rel=1e-5)


def test_search_goes_on_eagerly_when_capture_fails(search_store, tmp_path, monkeypatch):
    """A capture that raises in a whole search: one warning, the search completes eagerly with the plain step's
    genotype, and metrics.jsonl says so for every epoch (at the paper's architecture rate, as above)."""
    import json

    from ktnas.engine.search import capture as C

    plain = _search(search_store, tmp_path / "plain", capture="none", epochs=2, batch_size=8, schedule="paper")
    _emulated_graphs(monkeypatch)

    @contextlib.contextmanager
    def failing(g, capture_error_mode):
        raise RuntimeError("CUDA error: operation not supported when stream is capturing")
        yield

    monkeypatch.setattr(C.torch.cuda, "graph", failing)
    with pytest.warns(C.CaptureFallback) as w:
        got = _search(search_store, tmp_path / "failed", capture="graph", epochs=2, batch_size=8, schedule="paper")
    assert sum(isinstance(x.message, C.CaptureFallback) for x in w) == 1  # once: nothing is captured after that
    assert got["genotype"] == plain["genotype"]
    assert got["last"]["val_loss"] == pytest.approx(plain["last"]["val_loss"], rel=1e-5)
    recs = [json.loads(line) for line in (tmp_path / "failed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"]["mode"] for r in recs] == ["eager (capture failed: RuntimeError: CUDA error: operation not "
                                                  "supported when stream is capturing)"] * 2
    assert all(r["steps"]["replays"] == 0 and r["steps"]["called"] == 4 and r["eval"]["mode"] == "eager" for r in recs)


@pytest.mark.parametrize("algo,space", [("darts", "darts"), ("gdas", "nb201")])
def test_validation_costs_under_a_tenth_of_training(algo, space):
    """By the step profile's launch count (as on CUDA: fused kernels, edges recomputed), an epoch's validation
    pass (EVAL_GROUP batches per forward, no backward) launches under a tenth of the kernels its training steps do,
    first order (the cheapest training step)."""
    from ktnas.engine.search.run import EVAL_GROUP
    from ktnas.engine.profile.step import launches_of, profile_eval_pass, profile_search_step

    info = dict(in_channels=24, resolution=16, shape=[24, 16, 16], num_classes=10)
    cfg = resolve_config(SearchConfig(features="x", device="cpu", kernels="triton", recompute="edge", algo=algo,
                                      space=space, capture="graph"))
    r = profile_search_step(cfg, info, cfg.batch_size)
    step = launches_of(r["tracker"], r["triton_counts"])
    per_batch = profile_eval_pass(cfg, info, EVAL_GROUP * cfg.batch_size) / EVAL_GROUP
    assert EVAL_GROUP >= 2 and per_batch < step / 10, (per_batch, step)
