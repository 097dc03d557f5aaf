"""The step profile: one search step run under the instruments of :mod:`ktnas.engine.profile.instruments`, set up as on
CUDA, by default on fake tensors (shapes without data: the papers' batch 64 costs no memory and little time). The
run's hooks (saved tensors per forward, CUDA's autocast policy and foreach defaults), steady-state optimiser state,
the GDAS sample on fake tensors and the fused op's launch counter; :func:`profile_search_step` puts them together.
``--max-memory`` (``ktnas.engine.search.memory``) and ``ktnas bench step`` both read it."""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from ktnas.engine.algorithms.gdas import Gdas, gumbel_arch, gumbel_noise, hard_sample
from ktnas.engine.profile.instruments import CudaAutocast, StepTracker, allocated_bytes, saved_for_backward
from ktnas.engine.search.run import SearchRun
from ktnas.engine.search.supernet import MixedEdge


def gumbel_fake_safe(model, tau, gen, tracker):
    """GDAS' sample for fake tensors: the same operations on the device (``hard_sample``), the sampled indices
    drawn on real tensors (at the start of a search the alphas are ~0, so the argmax of the Gumbel noise is the
    sample) and the host read the real step does (``tolist()``) counted as a sync."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    arch = {}
    for t, a in model.alphas().items():
        shape = tuple(a.shape)
        with unset_fake_temporarily():
            idx_real = gumbel_noise(shape, gen).argmax(-1)
        # the same draw on fake tensors (which take no generator: torch's reference ops refuse one)
        w, _, _ = hard_sample(a, gumbel_noise(shape, None, a.device).to(a.device, a.dtype), tau)
        tracker.syncs += 1
        arch[t] = (w, idx_real.tolist())
    return arch


def profiled_run(cfg, info: dict, fake: bool, seed: int, darts_edges, precision: str):
    """The search run to profile, set up as on CUDA (foreach optimisers and clipping, autocast by the CUDA policy
    instead of the CPU's), its loss recording what each forward saves for backward: (run, saved, amp). ``amp``: the
    CUDA autocast mode to keep active over the whole step (None in fp32): the recomputation of checkpointed edges
    in backward then casts as their forward did; each forward starts with an empty weight-cast cache. The step
    runs eagerly; a ``cfg.capture`` other than none only makes GDAS sample as a captured step does (fixed shape):
    a captured step keeps what the eager one keeps (a CUDA graph's pool holds the eager step's peak)."""
    torch.manual_seed(seed)
    fixed = cfg.capture in ("graph", "compile")  # ktnas search resolves auto before it profiles
    with stay_on_cpu(fake):
        run = SearchRun(dataclasses.replace(cfg, capture="none"), torch.device("cpu"), info)
    run.fixed_arch = fixed
    run.model.train()
    if darts_edges is not None:
        for m in run.model.modules():
            if isinstance(m, MixedEdge):
                m.per_op_relu = darts_edges
    for opt in (run.w_opt, run.algorithm.a_opt):
        for g in opt.param_groups:
            g["foreach"] = True  # CUDA's default (multi-tensor kernels); the CPU's is a per-tensor loop
    run.amp = dict(run.amp, enabled=False)
    run.foreach = True
    saved, orig_loss = [], run.loss
    amp = CudaAutocast() if precision == "bf16" else None

    def loss(x, y, arch=None):  # one forward: its saved tensors; CUDA's autocast policy under bf16
        if amp is not None:
            amp.clear()
        with saved_for_backward(exclude=list(run.model.parameters())) as s:
            out = orig_loss(x, y, arch)
        saved.append(s)
        return out
    run.loss = loss
    return run, saved, amp


def run_sizes(run, inputs) -> dict:
    """Bytes CUDA's allocator books for the run's weights, their gradients, the optimisers' state and ``inputs``."""
    params = list(run.model.parameters())
    state = [v for opt in (run.w_opt, run.algorithm.a_opt) for st in opt.state.values() for v in st.values()
             if isinstance(v, torch.Tensor)]
    return dict(weights_bytes=allocated_bytes(params),
                grads_bytes=allocated_bytes(p.grad for p in params if p.grad is not None),
                optimizer_bytes=allocated_bytes(state), inputs_bytes=allocated_bytes(inputs))


def step_inputs(raw: bool, n: int, feat, raw_shape, num_classes: int) -> list:
    """A step's (xt, yt, xv, yv), raw uint8 images with ``raw`` (the stem on the fly), else features: the
    training batch serves as the validation batch too, so its bytes count once (at batch 64, 1.5 MiB of images or
    features less than two distinct batches)."""
    if raw:
        return [torch.randint(0, 256, (n, *raw_shape), dtype=torch.uint8), torch.randint(0, num_classes, (n,))] * 2
    return [torch.randn(n, *feat), torch.randint(0, num_classes, (n,))] * 2


def step_fn(run, frozen, precision: str, seed: int, epoch: int):
    """The step to profile: ``run.search_step`` at ``epoch`` (the architecture parameters train from the
    warm-up on), after the ``frozen`` stem on the device when given (the stem on the fly, as bench search)."""
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)

    def step(xt, yt, xv, yv):
        if frozen is not None:
            with CudaAutocast() if precision == "bf16" else contextlib.nullcontext():
                xt, xv = frozen(xt).float(), frozen(xv).float()
        return run.search_step(epoch, xt, yt, xv, yv, gen, rng)
    return step


def steady_state(run) -> None:
    """What a step finds after the first: SGD's momentum buffers, Adam's step count and moments, and every
    parameter's gradient of the previous step (set to None only by the weight step's ``zero_grad``; the
    architecture step's backward accumulates into the weights' ones). Made directly, as zeros: the same tensors an
    untimed first step would leave, at no cost (a fake step costs as much at batch 2 as at batch 64)."""
    with torch.no_grad():
        for p in run.model.parameters():
            p.grad = torch.zeros_like(p)
        for opt in (run.w_opt, run.algorithm.a_opt):
            for group in opt.param_groups:
                for p in group["params"]:
                    st = opt.state[p]
                    if isinstance(opt, torch.optim.SGD):
                        if group["momentum"]:
                            st["momentum_buffer"] = torch.zeros_like(p)
                    else:  # Adam
                        st["step"] = torch.tensor(1.0)
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)


@contextlib.contextmanager
def stay_on_cpu(fake: bool):
    """``Module.to`` as a no-op while the run is built on fake CPU tensors: they are made on the CPU already, and
    ``to`` would swap each fake parameter for itself, which torch refuses for fake tensors (their mode holds weak
    references to them)."""
    if not fake:
        yield
        return
    orig = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.nn.Module.to = orig


@contextlib.contextmanager
def gdas_patch(algo: str, fake: bool, tracker):
    """On fake tensors GDAS' sample cannot be read by the host: draw its indices on real tensors (see
    :func:`gumbel_fake_safe`); the fixed-shape sample of a captured step reads nothing, its noise is drawn without
    a generator (fake tensors take none)."""
    if algo != "gdas" or not fake:
        yield
        return
    orig = Gdas.sample

    def sample(self, epoch, gen):
        if self.run.fixed_arch:
            return gumbel_arch(self.model, self.tau(epoch), None, fixed=True)
        return gumbel_fake_safe(self.model, self.tau(epoch), gen, tracker)
    Gdas.sample = sample
    try:
        yield
    finally:
        Gdas.sample = orig


@contextlib.contextmanager
def fused_counter(fused: bool):
    """The fused op's own count of its Triton launches and the bytes they move: {kernel: {launches, bytes}}."""
    if not fused:
        yield {}
        return
    from ktnas.kernels import triton_mixed

    with triton_mixed.count_launches() as counts:
        yield counts


def profile_search_step(cfg, info: dict, batch: int, *, fake: bool = True, seed: int = 0, precision: str | None = None,
                        darts_edges: bool | None = None, frozen=None, raw_shape=(1, 28, 28)) -> dict:
    """Run one search step of the resolved ``cfg`` at ``batch`` under a :class:`StepTracker` (see the module
    docstring): {tracker, run, saved (per forward), sizes (weights, gradients, optimiser state, inputs), start_bytes
    (live before the step), peak_bytes, triton_counts}. ``frozen``: the stem run on raw images of ``raw_shape``
    first (KT-NAS on the fly); ``darts_edges``: every edge computed as DARTS' own ``MixedOp``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    precision = precision or cfg.precision
    feat = tuple(info["shape"])
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode, fused_counter(cfg.kernels == "triton") as triton_counts:
        tracker = StepTracker()
        with tracker:
            run, saved, amp = profiled_run(cfg, info, fake, seed, darts_edges, precision)
            if frozen is not None:
                tracker.track(*frozen.parameters(), *frozen.buffers())
            step = step_fn(run, frozen, precision, seed, run.arch_start)
            with gdas_patch(cfg.algo, fake, tracker):
                steady_state(run)  # as after earlier steps: optimiser state and gradients in place
                batch_in = step_inputs(frozen is not None, batch, feat, raw_shape, info["num_classes"])
                base = tracker.current
                tracker.reset_peak()
                triton_counts.clear()
                with tracker.count(), amp or contextlib.nullcontext():
                    step(*batch_in)
            sizes = run_sizes(run, batch_in)
    return dict(tracker=tracker, run=run, saved=saved, sizes=sizes, start_bytes=base, peak_bytes=tracker.peak,
                triton_counts=dict(triton_counts))


def launches_of(counts_tracker, triton_counts) -> int:
    """Kernel launches an instrumented block issued: ATen's (the tracker's) and the fused op's Triton ones."""
    return counts_tracker.launches + sum(c["launches"] for c in triton_counts.values())


def profile_eval_pass(cfg, info: dict, batch: int) -> int:
    """Kernel launches of one forward of the validation pass (``SearchRun.evaluate``: no gradients) at ``batch``
    samples, on fake tensors, set up as on CUDA. The architecture: the relaxation; for an algorithm that evaluates
    one op per edge (GDAS' argmax) the space's first parametric op on every edge, the dearest a pass can be."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ktnas.engine.ops import has_params

    with FakeTensorMode(allow_non_fake_inputs=True), fused_counter(cfg.kernels == "triton") as triton_counts:
        tracker = StepTracker()
        with tracker:
            run, _, _ = profiled_run(cfg, info, True, 0, None, cfg.precision)
            x = step_inputs(False, batch, tuple(info["shape"]), None, info["num_classes"])[0]
            arch = None
            if cfg.algo == "gdas":
                ops = run.model.space.ops
                k = next(i for i, o in enumerate(ops) if has_params(o, 1))
                arch = {t: (torch.nn.functional.one_hot(torch.full((a.shape[0],), k), len(ops)).float(),
                            [k] * a.shape[0]) for t, a in run.model.alphas().items()}
            triton_counts.clear()
            with tracker.count(), torch.no_grad():
                run.model(x, arch)
    return launches_of(tracker, triton_counts)
