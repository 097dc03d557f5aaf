"""Instruments that see what a step costs on a GPU without running it on one.

- :class:`StepTracker`, a ``TorchDispatchMode``: every ATen operation below autograd passes through it. It keeps the
  live tensor storages (key: the storage's ``_cdata``; bytes rounded as CUDA's caching allocator rounds a request:
  up to a multiple of 512 B; freed in a ``weakref.finalize`` on the storage), so ``peak`` is what
  ``torch.cuda.max_memory_allocated`` would report, and it counts the operations that would launch a CUDA kernel
  (views, ``empty*`` and metadata-only operations excluded; a ``foreach`` operation as the launches of CUDA's
  multi-tensor apply; ``.item()`` and its kin apart, as host syncs), with the bytes each one reads and writes,
  and the FLOPs of each (``torch.utils.flop_counter``'s formulas; counted here rather than under its
  ``FlopCounterMode``, whose module hooks keep recomputed tensors alive under activation checkpointing).
  Run under ``FakeTensorMode`` with fake CPU tensors, a batch-64 step is measured without being computed.
- :func:`saved_for_backward`: bytes of the unique storages autograd saves for backward (parameters excluded).
- :class:`CudaAutocast`: CUDA's autocast cast policy (bfloat16) as a ``TorchFunctionMode``, so a CPU run casts
  what CUDA casts (CPU autocast casts other operations).

Blind spots (what ``max_memory_allocated`` would add on a GPU): cuDNN / cuBLAS workspaces, the CUDA context, graph
pools; fragmentation shows in ``memory_reserved``, not here. Triton launches of the fused op are not ATen operations:
the op counts them itself (``ktnas.kernels.triton_mixed``).
"""
from __future__ import annotations

import math
import weakref
from collections import Counter
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

ALLOC_ROUND = 512  # CUDA's caching allocator rounds every request up to a multiple of 512 bytes
# operations that launch nothing on a GPU (allocation without initialisation, metadata, aliasing)
NO_KERNEL = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "t", "expand", "lift_fresh",
    "alias", "view", "_unsafe_view", "as_strided", "resize_", "set_", "is_same_size", "_reshape_alias", "unsqueeze",
    "squeeze", "permute", "transpose", "select", "slice", "split", "split_with_sizes", "unbind", "chunk",
    "narrow", "diagonal", "unfold", "view_as", "_has_compatible_shallow_copy_type", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride", "record_stream", "_to_copy_noop",
    "_conj", "_neg_view", "lift", "zeros_like_noop"})
SYNCS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero"})  # host reads a device value
# CUDA's multi_tensor_apply: tensors per launch by the number of tensor lists (depth), from ATen's
# MultiTensorApply.cuh (depth_to_max_tensors {110, 64, 48, 36, 30})
FOREACH_TENSORS_PER_LAUNCH = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}


def cuda_bytes(nbytes: int, round_to: int = ALLOC_ROUND) -> int:
    """Bytes CUDA's caching allocator books for a request of ``nbytes`` (0 stays 0)."""
    return 0 if nbytes <= 0 else round_to * math.ceil(nbytes / round_to)


def allocated_bytes(tensors) -> int:
    """Bytes CUDA's caching allocator books for ``tensors``, each a request of its own (see :func:`cuda_bytes`)."""
    return sum(cuda_bytes(_tensor_bytes(t)) for t in tensors)


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class StepTracker(TorchDispatchMode):
    """Live storages, peak bytes and kernel launches of everything dispatched while it is active.

    ``track(*tensors)`` registers tensors made before it (parameters, optimiser state, inputs). Memory is tracked
    at all times; launches, syncs, bytes moved and per-op counts only while ``counting`` (see :meth:`count`).
    ``round_to``: allocator rounding (512 as CUDA; 1 to compare with a CPU allocator's exact bytes)."""

    def __init__(self, round_to: int = ALLOC_ROUND):
        super().__init__()
        self.round_to = round_to
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.counting = False
        self.ops: Counter = Counter()
        self.launches = 0
        self.syncs = 0
        self.bytes_moved = 0
        self.flops: Counter = Counter()  # FLOPs per operation (torch.utils.flop_counter's formulas)

    # -------------------------------------------------------------------------------------------- memory
    def track(self, *tensors) -> None:
        for t in _tensors(tensors):
            if t.layout != torch.strided:
                continue
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrappers)
                continue
            key = st._cdata
            if key in self.live:
                continue
            b = cuda_bytes(st.nbytes(), self.round_to)
            self.live[key] = b
            self.current += b
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    @contextmanager
    def count(self):
        """Count launches, syncs and bytes moved inside the block (memory is tracked regardless)."""
        self.counting = True
        try:
            yield self
        finally:
            self.counting = False

    # -------------------------------------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.track(out)
        if self.counting:
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops[str(func._overloadpacket)] += int(formula(*args, **kwargs, out_val=out))
        ns, _, name = func._schema.name.rpartition("::")
        if ns != "aten":  # prim:: metadata; custom operators count their own launches (the fused mixed op does)
            return
        if name in SYNCS:
            self.syncs += 1
            self.ops[name] += 1
            return
        if name in NO_KERNEL or _is_view(func):
            return
        ins = _tensors((args, kwargs))
        outs = _tensors(out)
        if name.startswith("_foreach_"):
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            n = max((len(a) for a in lists), default=1)
            per = FOREACH_TENSORS_PER_LAUNCH.get(len(lists) + (0 if func._schema.name.endswith("_") else 1), 30)
            launches = max(1, math.ceil(n / per))
        else:
            launches = 0 if all(t.numel() == 0 for t in outs) and outs else 1
        self.launches += launches
        self.ops[name] += launches
        self.bytes_moved += sum(_tensor_bytes(t) for t in ins) + sum(_tensor_bytes(t) for t in outs)


def _is_view(func) -> bool:
    is_view = getattr(func, "is_view", None)
    if is_view is not None:
        return bool(is_view)
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


@contextmanager
def saved_for_backward(exclude=()):
    """Sum the bytes of the unique storages autograd saves for backward inside the block (``exclude``: tensors
    not to count, e.g. the parameters). Yields a dict whose ``bytes`` holds the running total."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: set[int] = set()
    res = {"bytes": 0}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            key = t.untyped_storage()._cdata
            if key not in skip and key not in seen:
                seen.add(key)
                res["bytes"] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield res


# ------------------------------------------------------------------------------------ CUDA's autocast policy
def _names(*names):
    return frozenset(names)


# CUDA autocast (aten/src/ATen/autocast_mode.cpp): operations run in the low precision ...
LOW = _names("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
             "_convolution", "conv_tbc", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv", "linear",
             "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "scaled_dot_product_attention")
# ... and in float32 (the fp32 list, and the ones that take float32 when given no dtype)
FP32 = _names("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
              "sinh", "tan", "pow", "softplus", "layer_norm", "group_norm", "norm", "nuclear_norm", "cosine_similarity",
              "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
              "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
              "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits",
              "dist", "pdist", "cdist", "renorm", "logsumexp", "cross_entropy", "cross_entropy_loss", "softmax",
              "log_softmax", "cumsum", "cumprod", "prod", "sum", "linalg_vector_norm", "linalg_matrix_norm")


def _func_name(func) -> str:
    return getattr(func, "__name__", "") or ""


class CudaAutocast(TorchFunctionMode):
    """``torch.autocast('cuda', torch.bfloat16)``'s cast policy applied to tensors on any device: floating inputs
    of the low-precision operations cast to bfloat16, of the float32 ones to float32 (autograd records the casts,
    as it does autocast's). Leaf tensors that require grad (the weights) are cast once per region (autocast's weight
    cast cache). Use it in place of ``torch.autocast`` where the device's own policy differs from CUDA's."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.cache: dict[int, torch.Tensor] = {}

    def _cast(self, v, dtype):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype and v.dtype != torch.float64:
            if v.is_leaf and v.requires_grad:
                key = id(v)  # the entry keeps v alive, so its id is not reused while cached
                if key not in self.cache:
                    self.cache[key] = (v, v.to(dtype))
                return self.cache[key][1]
            return v.to(dtype)
        if isinstance(v, (list, tuple)):
            return type(v)(self._cast(x, dtype) for x in v)
        return v

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _func_name(func)
        if name in LOW:
            args, kwargs = self._cast(args, self.dtype), {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
        elif name in FP32 and kwargs.get("dtype") is None:
            if any(isinstance(t, torch.Tensor) and t.dtype == self.dtype for t in _tensors((args, kwargs))):
                args = self._cast(args, torch.float32)
                kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def clear(self) -> None:
        """Forget the cast weights (as autocast does at the end of its region); for a mode kept active over a
        whole step, so that activation checkpointing's recomputation in backward casts as its forward did."""
        self.cache.clear()

    def __exit__(self, *exc):
        self.clear()
        return super().__exit__(*exc)


def cpu_allocator_peak(fn) -> int:
    """Peak bytes the CPU allocator held during ``fn()`` above what it held before, from the profiler's raw
    ``[memory]`` records (cumulated in time order; its summary tables drop allocations made inside operations):
    the ground truth :class:`StepTracker` is checked against on a real CPU step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak
