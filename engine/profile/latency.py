"""Measured latency of a model on a runtime: PyTorch eager, TorchScript or ONNX Runtime, at batch 1 and a larger
batch, the median of timed runs after warm-up runs (on CUDA, synchronised)."""
from __future__ import annotations

import statistics
import time

import torch

from ktnas.cache.errors import KtnasError

BATCHES = (1, 32)


def median_ms(run, *, warmup: int = 2, repeats: int = 10, sync=None, min_seconds: float = 0.0) -> float:
    """The median wall time of ``run()`` in milliseconds over ``repeats`` runs after ``warmup`` runs, more runs
    while they have taken under ``min_seconds`` (a window long enough that a passing disturbance of a shared
    machine does not decide the median)."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds * 1e3:
        if sync:
            sync()
        t = time.perf_counter()
        run()
        if sync:
            sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def runner(model, runtime: str, device: str = "cpu", threads: int | None = None):
    """A function inputs -> outputs for ``model``: an nn.Module (runtime 'torch'), a TorchScript file
    ('torchscript') or an ONNX file ('onnxruntime'; ``threads``: its intra-op threads, default its own choice)."""
    if runtime == "torch":
        model = model.to(device).eval()
        return lambda x: model(x.to(device))
    if runtime == "torchscript":
        m = torch.jit.load(str(model), map_location=device)
        return lambda x: m(x.to(device))
    if runtime == "onnxruntime":
        sess = ort_session(model, device, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x.numpy()})[0]
    raise KtnasError(f"unknown runtime {runtime!r}: use torch, torchscript or onnxruntime")


def ort_session(path, device: str = "cpu", threads: int | None = None):
    """An ONNX Runtime session of the file ``path`` on ``device`` (CUDA through its CUDA execution provider)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise KtnasError("measuring ONNX latency needs onnxruntime: pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise KtnasError("this onnxruntime has no CUDA execution provider: pip install onnxruntime-gpu, or "
                             "measure on --device cpu")
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), opts, providers=providers)


@torch.no_grad()
def latency(model, runtime: str, shape, *, device: str = "cpu", batches=BATCHES, repeats: int = 10) -> dict:
    """{batch: median ms} of ``model`` on uint8 images of ``shape`` (C, H, W)."""
    run = runner(model, runtime, device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    out = {}
    for b in batches:
        x = torch.randint(0, 256, (b, *shape), dtype=torch.uint8)
        out[b] = median_ms(lambda: run(x), repeats=repeats, sync=sync)
    return out


def latency_line(ms: dict, runtime: str, device: str = "cpu") -> str:
    parts = [f"batch {b}: {t:.2f} ms ({t / b:.2f} ms/image)" if b > 1 else f"batch 1: {t:.2f} ms"
             for b, t in ms.items()]
    return f"latency on {runtime} ({device}): " + ", ".join(parts)
