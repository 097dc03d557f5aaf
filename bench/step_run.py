"""How ``ktnas bench step`` sets a search run up to be profiled as on CUDA, on fake tensors: the run's hooks
(saved tensors per forward, CUDA's autocast policy and foreach defaults), steady-state optimiser state, the GDAS
sample on fake tensors, and the fused op's launch counter."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ktnas.engine.algorithms.gdas import Gdas, gumbel_noise, hard_sample
from ktnas.engine.searcher import SearchRun
from ktnas.engine.supernet import MixedEdge

from .profile import CudaAutocast, allocated_bytes, saved_for_backward


def gumbel_fake_safe(model, tau, gen, tracker):
    """GDAS' sample for fake tensors: the same operations on the device (``hard_sample``), the sampled indices
    drawn on real tensors (at the start of a search the alphas are ~0, so the argmax of the Gumbel noise is the
    sample) and the host reads the real step does (``isfinite().all()``, ``tolist()``) counted as syncs."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    arch = {}
    for t, a in model.alphas().items():
        shape = tuple(a.shape)
        with unset_fake_temporarily():
            idx_real = gumbel_noise(shape, gen).argmax(-1)
        # the same draw on fake tensors (which take no generator: torch's reference ops refuse one)
        w, _ = hard_sample(a, gumbel_noise(shape, None).to(a.device, a.dtype), tau)
        torch.isfinite(w).all()
        tracker.syncs += 2
        arch[t] = (w, idx_real.tolist())
    return arch


def profiled_run(cfg, info: dict, fake: bool, seed: int, darts_edges, precision: str):
    """The search run to profile, set up as on CUDA (foreach optimisers and clipping, autocast by the CUDA policy
    instead of the CPU's), its loss recording what each forward saves for backward: (run, saved, amp). ``amp``: the
    CUDA autocast mode to keep active over the whole step (None in fp32): the recomputation of checkpointed edges
    in backward then casts as their forward did; each forward starts with an empty weight-cast cache."""
    torch.manual_seed(seed)
    with stay_on_cpu(fake):
        run = SearchRun(cfg, torch.device("cpu"), info)
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


def step_inputs(config: str, n: int, feat, raw_shape, num_classes: int) -> list:
    """A step's (xt, yt, xv, yv): the training batch serves as the validation batch too, so its bytes count once
    (at batch 64, 1.5 MiB of images or features less than two distinct batches)."""
    if config == "stem-on-the-fly":
        return [torch.randint(0, 256, (n, *raw_shape), dtype=torch.uint8), torch.randint(0, num_classes, (n,))] * 2
    return [torch.randn(n, *feat), torch.randint(0, num_classes, (n,))] * 2


def step_fn(run, config: str, frozen, precision: str, seed: int, epoch: int):
    """The step to profile: ``run.search_step`` at ``epoch`` (the architecture parameters train from the
    warm-up on), after the frozen stem on the device for stem-on-the-fly (as bench search)."""
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)

    def step(xt, yt, xv, yv):
        if config == "stem-on-the-fly":
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
    :func:`gumbel_fake_safe`)."""
    if algo != "gdas" or not fake:
        yield
        return
    orig = Gdas.sample
    Gdas.sample = lambda self, epoch, gen: gumbel_fake_safe(self.model, self.tau(epoch), gen, tracker)
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
