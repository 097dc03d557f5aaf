"""``ktnas search --capture``: the search step run as one captured unit instead of op by op.

- ``graph`` (CUDA): each epoch's step -- architecture step, weight step, both optimisers -- recorded once in a
  CUDA graph and replayed for every full batch, one launch per step. The epoch's first :data:`GRAPH_WARMUP` steps
  run eagerly on a side stream (they are real steps of the search: lazy optimiser state, cuDNN plans and the
  Triton compiles happen there), the next one is captured and replayed; a smaller last batch runs eagerly. The
  graph is captured again each epoch, since the learning rate (and GDAS' temperature) are baked into it. The
  architecture optimiser (Adam) keeps its step counter on the device (``capturable``) for the graph's epochs, and
  autocast's weight-cast cache is off (not capture-safe).
- ``compile``: the network's forward (and with it, through AOT autograd, its backward) compiled by
  ``torch.compile`` for full batches; any device, the CPU included.
- ``none``: the plain eager step. ``auto``: ``graph`` on a single CUDA device where the algorithm allows it,
  else ``none``.

Capture needs a step of fixed shape: GDAS then computes its sample as tensor operations (every op of an edge
with one-hot-masked weights; see ``algorithms.gdas``), which gives the same values and gradients as computing the
sampled op alone. Random search with weight sharing draws a genotype on the host every step and is refused.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from ktnas.cache.errors import KtnasError

CAPTURE = ("auto", "none", "graph", "compile")
GRAPH_WARMUP = 3  # eager steps of each epoch before its capture


def check_capture(capture: str) -> str:
    """``capture`` if it is a ``--capture`` value (one-line KtnasError otherwise)."""
    if capture not in CAPTURE:
        raise KtnasError(f"unknown --capture {capture!r}: use one of {', '.join(CAPTURE)}")
    return capture


def resolve_capture(capture: str, algorithm, device, world_size: int = 1) -> str:
    """``--capture`` as run here: 'none', 'graph' or 'compile' (one-line KtnasError where it cannot run)."""
    if check_capture(capture) == "auto":
        return "graph" if device.type == "cuda" and world_size == 1 and algorithm.capturable else "none"
    if capture != "none" and not algorithm.capturable:
        raise KtnasError(f"--capture {capture} with --algo {algorithm.name}: {algorithm.capture_refusal}; use "
                         f"--capture none")
    if capture == "graph" and device.type != "cuda":
        raise KtnasError(f"--capture graph records the step in a CUDA graph: this search runs on {device}; use "
                         f"--capture compile (torch.compile, any device) or none")
    if capture == "graph" and world_size > 1:
        raise KtnasError("--capture graph under torchrun: the gradient all-reduce reads which gradients exist on "
                         "the host, which a graph cannot; use --capture compile or none")
    return capture


def root_cause(e: BaseException) -> str:
    """``Type: first line`` of the exception that started ``e``'s chain (a failed capture raises again when it
    ends: the first error is the one that names the operation)."""
    seen = {id(e)}
    while e.__context__ is not None and id(e.__context__) not in seen:
        e = e.__context__
        seen.add(id(e))
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def compile_network(model: torch.nn.Module, backend: str):
    """``torch.compile(model, backend=backend)`` (its parameters are the model's own)."""
    try:
        return torch.compile(model, backend=backend)
    except Exception as e:  # noqa: BLE001 - an unknown backend, a platform torch.compile does not support
        raise KtnasError(f"--capture compile: torch.compile refuses backend {backend!r} ({root_cause(e)}); pass "
                         f"--compile-backend inductor or aot_eager, or --capture none") from None


def set_capturable(optimizer: torch.optim.Optimizer, on: bool) -> None:
    """Turn ``capturable`` on or off for every group of ``optimizer`` (Adam's step counter then lives on the
    device, as a captured step needs). Each parameter's ``step`` is moved beside it as torch's own state policy
    does for capturable optimisers: a resumed run loads its checkpoint on the CPU, where a captured step cannot
    read it ("params and state_steps must be on supported devices")."""
    for g in optimizer.param_groups:
        g["capturable"] = on
        for p in g["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if on and isinstance(step, torch.Tensor) and (step.device != p.device or step.dtype != torch.float32):
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


class GraphStep:
    """One epoch's search step in a CUDA graph (see the module docstring): ``step(xt, yt, xv, yv)`` (the eager
    step) is called as is for the warm-up and for batches of another shape, captured once, then replayed.

    Before the capture every gradient is cleared (set to None), so the graph allocates its gradients in its own
    pool: a gradient left by the warm-up lives in the allocator's general pool, and the graph would write into
    it on every replay after the step had released it. A capture that fails (any error, out of memory included)
    does not end the search: one warning line names the cause, the batch runs eagerly (gradients cleared
    first) and so does the rest of the epoch; :attr:`failed` keeps the cause, :attr:`replays` and
    :attr:`called` (steps run by calling the step: warm-up, other shapes, after a failure) count how they ran."""

    def __init__(self, run, step, warmup: int = GRAPH_WARMUP, what: str = "search step"):
        self.run, self.step, self.warmup, self.device, self.what = run, step, warmup, run.device, what
        self.graph = self.static = self.out = None
        self.seen = self.replays = self.called = 0
        self.failed: str | None = None
        self.side = torch.cuda.Stream(self.device)

    def __call__(self, *batch):
        if self.graph is not None and [t.shape for t in batch] == [t.shape for t in self.static]:
            self.replays += 1
            return self._replay(batch)
        if self.graph is not None or self.failed is not None:
            return self._eager(batch)
        if self.seen < self.warmup:
            self.seen += 1
            return self._side(batch)
        if not self._capture(batch):
            return self._eager(batch)
        self.replays += 1
        return self._replay(batch)

    def _eager(self, batch):
        self.called += 1
        return self.step(*batch)

    def _side(self, batch):
        cur = torch.cuda.current_stream(self.device)
        self.side.wait_stream(cur)
        with torch.cuda.stream(self.side):
            out = self._eager(batch)
        cur.wait_stream(self.side)
        return out

    def _clear_grads(self) -> None:
        for p in self.run.model.parameters():  # as both optimisers' zero_grad(set_to_none=True)
            p.grad = None

    def _capture(self, batch) -> bool:
        """Capture the step on static copies of ``batch``; False (after one warning line) when it fails."""
        torch.cuda.synchronize(self.device)
        self._clear_grads()
        self.static = [t.clone() for t in batch]
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the feature loader's threads (pinned host buffers) may run while this thread captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.out = self.step(*self.static)
        except Exception as e:  # noqa: BLE001 - any capture failure: the step runs eagerly instead
            self.failed = root_cause(e)
            self.graph = self.static = self.out = None
            self._clear_grads()  # what the failed capture left behind is not a step's gradient
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            warnings.warn(f"--capture graph: the {self.what} could not be captured in a CUDA graph ({self.failed}); "
                          f"running it eagerly (pass --capture none to skip the attempt)", CaptureFallback,
                          stacklevel=2)
            return False
        self.graph = graph
        return True

    def _replay(self, batch):
        for dst, src in zip(self.static, batch):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.out

    def report(self) -> dict:
        """How the epoch's steps ran: ``{"mode": "graph" | "eager (capture failed: ...)", "replays", "called"}``."""
        mode = "graph" if self.failed is None else f"eager (capture failed: {self.failed})"
        return dict(mode=mode, replays=self.replays, called=self.called)

    def close(self) -> None:
        """Free the graph and its memory pool (before the next epoch's capture)."""
        self.graph = self.static = self.out = None


class CaptureFallback(UserWarning):
    """A captured step fell back to the eager one (the warning's one line says why)."""
