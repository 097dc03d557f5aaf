"""Measured latency on a runtime: PyTorch eager, TorchScript or ONNX Runtime, the median of timed runs after
warm-up runs (on CUDA, synchronised). :func:`latency` times a model at batch 1 and a larger batch (``ktnas export``,
``ktnas evaluate``); :class:`Timer`, :func:`measure_table` and :func:`check_table` measure a latency table's ops,
its calibration and its held-out check (:mod:`ktnas.engine.profile.latency_table`, ``ktnas bench latency``)."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ktnas.cache.errors import KtnasError
from ktnas.engine.profile.latency_table import (RUNTIMES, LatencyModel, LatencyTable, Target, environment, fit,
                                                model_for, op_shapes, ops_sums)

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
def latency(model, runtime: str, shape, *, device: str = "cpu", batches=BATCHES, repeats: int = 10,
            threads: int | None = None) -> dict:
    """{batch: median ms} of ``model`` on uint8 images of ``shape`` (C, H, W), the batches timed in ``ROUNDS``
    interleaved rounds as :class:`Timer` times (the median of the rounds' medians); ``threads``: the runtime's
    intra-op threads (default its own choice)."""
    before = torch.get_num_threads()
    if threads and runtime != "onnxruntime":
        torch.set_num_threads(int(threads))
    try:
        run = runner(model, runtime, device, threads=threads)
        sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
        xs = {b: torch.randint(0, 256, (b, *shape), dtype=torch.uint8) for b in batches}
        times: dict = {b: [] for b in batches}
        for _ in range(ROUNDS):
            for b, x in xs.items():
                times[b].append(median_ms(lambda: run(x), repeats=repeats, sync=sync,
                                          min_seconds=MIN_SECONDS / ROUNDS))
        return {b: statistics.median(t) for b, t in times.items()}
    finally:
        torch.set_num_threads(before)


def latency_line(ms: dict, runtime: str, device: str = "cpu", threads: int | None = None) -> str:
    parts = [f"batch {b}: {t:.2f} ms ({t / b:.2f} ms/image)" if b > 1 else f"batch 1: {t:.2f} ms"
             for b, t in ms.items()]
    where = f"{device}, {threads} thread{'s' if threads > 1 else ''}" if threads else device
    return f"latency on {runtime} ({where}): " + ", ".join(parts)


REPEATS = 30  # timed runs per measurement at least (the median is kept), after warm-up runs
MIN_SECONDS = 0.3  # and as many more as make this long, over all rounds
ROUNDS = 3  # interleaved rounds over a group of modules
GROUP = 8  # modules measured together (and saved after)


class Timer:
    """Median latency of modules on one runtime, device, batch and thread count. A group of modules is measured
    in ``rounds`` interleaved rounds and each keeps the median of its rounds' medians: a disturbance of a shared
    machine that lasts a while then spoils one round of several modules, not every run of one."""

    def __init__(self, runtime: str, device: str = "cpu", batch: int = 1, threads: int | None = None,
                 repeats: int | None = None, min_seconds: float | None = None, rounds: int | None = None):
        if runtime not in RUNTIMES:
            raise KtnasError(f"unknown --runtime {runtime!r}: use {' or '.join(RUNTIMES)}")
        if runtime == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
                import onnxscript  # noqa: F401
            except ImportError:
                raise KtnasError("--runtime onnxruntime needs onnxruntime, onnx and onnxscript: pip install "
                                 "'ktnas[export]' onnxruntime (or use --runtime torch)") from None
        if batch < 1:
            raise KtnasError(f"--batch must be at least 1, got {batch}")
        self.runtime, self.device, self.batch, self.threads = runtime, str(device), batch, threads
        self.repeats = REPEATS if repeats is None else repeats
        self.min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
        self.rounds = ROUNDS if rounds is None else rounds
        self.tmp = tempfile.TemporaryDirectory(prefix="ktnas-latency-")
        self._n = 0

    def prepare(self, module: nn.Module, x: torch.Tensor):
        """A function that runs ``module`` on ``x`` on the runtime (ONNX Runtime: exported first)."""
        module = module.eval().requires_grad_(False)
        if self.runtime == "onnxruntime":
            from ktnas.engine.train.onnx_file import write_onnx

            self._n += 1
            path = Path(self.tmp.name) / f"m{self._n}.onnx"
            write_onnx(module, x, path, dynamic=False)
            run = runner(path, "onnxruntime", self.device, threads=self.threads)
            path.unlink()  # the session holds the model
        else:
            run = runner(module, "torch", self.device)
            x = x.to(self.device)
        return lambda: run(x)

    def measure(self, items) -> list[float]:
        """Median ms of each (module, input batch) of ``items``."""
        runs = [self.prepare(m, x) for m, x in items]
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else None
        per: list[list[float]] = [[] for _ in runs]
        with torch.no_grad():
            for _ in range(self.rounds):
                for times, run in zip(per, runs):
                    times.append(median_ms(run, warmup=3, repeats=self.repeats, sync=sync,
                                           min_seconds=self.min_seconds / self.rounds))
        return [statistics.median(t) for t in per]

    def images(self, target: Target) -> torch.Tensor:
        return torch.randint(0, 256, (self.batch, *target.input_shape), dtype=torch.uint8)

    def models(self, target: Target, genotypes) -> list[float]:
        """Median ms of each genotype's whole exported model on uint8 images."""
        x = self.images(target)
        return self.measure([(model_for(target, g), x) for g in genotypes])

    def close(self) -> None:
        self.tmp.cleanup()


def measure_table(target: Target, timer: Timer, *, calibrate: int = 5, seed: int = 0, progress: bool = True,
                  table: LatencyTable | None = None, save=None, announce=None) -> LatencyTable:
    """Measure every op of ``target``'s space at every shape its network gives it, the stem, and the space's probe
    models and ``calibrate`` random ones (the fixed part and the op scales). ``table``: a partly measured one to go
    on from (what it has is kept); ``save(table)`` is called after each group of measurements, so an interrupted
    run resumes; ``announce()`` once before the first measurement, if any is left."""
    from ktnas.engine.runs import progress as bar
    from ktnas.engine.spaces import get_space
    from ktnas.engine.train.network import build_network

    space = get_space(target.space)
    table = table or LatencyTable(target, environment(timer.runtime, timer.device, timer.threads))
    table.created = table.created or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    todo: dict[str, tuple] = {}  # key -> (probe genotype, module path)
    for g in space.cost_probes():
        for *_, key, path in op_shapes(space, g, target.build):
            if key not in table.ops:
                todo.setdefault(key, (g, path))
    rng = np.random.default_rng([seed, 1])  # the check draws from [seed, 2]: calibration is held out
    genotypes = list(space.cost_probes()) + [space.random_genotype(rng) for _ in range(calibrate)]
    if announce and (todo or table.stem_ms is None or len(table.calibration) < len(genotypes)):
        announce()
    nets: dict[int, nn.Module] = {}
    with bar(total=len(todo), desc="latency: ops", enabled=progress) as pb:
        for group in _groups(list(todo.items())):
            items = []
            for key, (g, path) in group:
                if id(g) not in nets:
                    nets[id(g)] = build_network(g, **target.build).eval()
                shape = [int(v) for v in key.split(" ")[1].split("->")[0].split("x")]
                items.append((nets[id(g)].get_submodule(path), torch.randn(timer.batch, *shape)))
            for (key, _), ms in zip(group, timer.measure(items)):
                table.ops[key] = ms
            pb.update(len(group))
            if save:
                save(table)
    if table.stem_ms is None:
        stem = model_for(target, space.cost_probes()[0]).stem
        table.stem_ms = timer.measure([(stem, timer.images(target))])[0]
    _same_models(table.calibration, genotypes, "calibration", "--calibrate")
    with bar(total=len(genotypes), initial=min(len(table.calibration), len(genotypes)), desc="latency: calibration",
             enabled=progress) as pb:
        for group in _groups(genotypes[len(table.calibration):]):
            for g, ms in zip(group, timer.models(target, group)):
                table.calibration.append(dict(genotype=g.to_json(), measured_ms=ms, ops_ms=ops_sums(table, g)))
            pb.update(len(group))
            if save:
                save(table)
    table.fixed_ms, table.scales = fit(table.calibration, space.ops)
    return table


def _same_models(rows: list[dict], genotypes: list, what: str, flag: str) -> None:
    """One-line KtnasError when a table's ``what`` rows are not the models this run draws (another --seed)."""
    if any(r["genotype"] != g.to_json() for r, g in zip(rows, genotypes)):
        raise KtnasError(f"the latency table's {what} models were drawn with another --seed (or {flag}): rerun with "
                         "the table's own, or measure into another --out")


def _groups(items: list, size: int = GROUP) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def check_table(table: LatencyTable, timer: Timer, n: int, *, seed: int = 0, progress: bool = True,
                save=None) -> list[dict]:
    """Predicted against measured latency of ``n`` random models (held out from the calibration); rows appended
    to ``table.check`` as they are measured (resumable through ``save``)."""
    from ktnas.engine.runs import progress as bar
    from ktnas.engine.spaces import get_space

    space, model = get_space(table.target.space), LatencyModel(table)
    rng = np.random.default_rng([seed, 2])
    genotypes = [space.random_genotype(rng) for _ in range(n)]
    _same_models(table.check, genotypes, "check", "--check")
    with bar(total=n, initial=min(len(table.check), n), desc="latency: check", enabled=progress) as pb:
        for group in _groups(genotypes[len(table.check):]):
            for g, ms in zip(group, timer.models(table.target, group)):
                table.check.append(dict(genotype=g.to_json(), predicted_ms=model.predict(g), measured_ms=ms))
            pb.update(len(group))
            if save:
                save(table)
    return table.check[:n]


