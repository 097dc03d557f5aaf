"""Latency of a genotype's exported model on a target runtime, predicted from a look-up table of its ops.

ProxylessNAS' and FBNet's latency model: every op a space may place on an edge is measured on its own, at every
input shape, stride and width the evaluation network gives it (``sep_conv_3x3 32x16x16->32x16x16``), on the target
runtime (ONNX Runtime or PyTorch, CPU or CUDA) and batch. A network's latency is then
``fixed + Σ_cells Σ_edges op_ms(shape)``: ``fixed`` is what does not depend on the genotype (the frozen stem, each
cell's input convolutions, the sums and concatenations of its nodes, the classifier, and each op's own call
overhead, the same for every genotype since each network runs as many ops), read off a few whole models measured
at calibration (the median of measured minus the ops' sum). :class:`LatencyModel` lays the table out as
:class:`~ktnas.engine.profile.cost.CostModel` lays out weights (a [edges, ops] array per cell type, summed over
the cells of that type), so a budgeted search weighs expected latency as it weighs expected weights.

A table is a JSON file (:class:`LatencyTable`): the ops' medians, the fixed part, the calibration and the held-out
check if one ran, keyed by the environment it was measured in (runtime, device, threads, versions) and by the
network it describes (space, layout, frozen stem, raw image shape, batch); a budget refuses a table measured for
another network in one line."""
from __future__ import annotations

import json
import platform
import statistics
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ktnas.cache.errors import KtnasError

FORMAT = "ktnas-latency-table"
FORMAT_VERSION = 1
RUNTIMES = ("onnxruntime", "torch")
REPEATS = 30  # timed runs per measurement at least (the median is kept), after warm-up runs
MIN_SECONDS = 0.3  # and as many more as make this long, over all rounds
ROUNDS = 3  # interleaved rounds over a group of modules
GROUP = 8  # modules measured together (and saved after)


# ------------------------------------------------------------------------------------------- what is measured
@dataclass(frozen=True)
class Target:
    """The exported model a table describes: space, the evaluation network's build (``build_network``'s keyword
    arguments, layout resolved), the frozen stem (spec, image size), the raw image shape (C, H, W) and batch."""
    space: str
    build: dict
    stem: str
    image_size: int
    input_shape: tuple
    batch: int = 1

    def to_json(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Target":
        return cls(d["space"], dict(d["build"]), d["stem"], int(d["image_size"]), tuple(d["input_shape"]),
                   int(d.get("batch", 1)))

    def describe(self) -> str:
        b = self.build
        return (f"{self.space} {b.get('layers')} cells C={b.get('channels')} on {self.stem} at {self.image_size} px, "
                f"images {'x'.join(map(str, self.input_shape))}, batch {self.batch}")


def target_for(space, info: dict, *, layers=None, channels=None, reductions=None, batch: int = 1,
               input_shape=None) -> Target:
    """The Target of the model ``ktnas train`` builds on a feature store described by ``info``
    (:func:`ktnas.engine.data.feature_info`) at the given layout (None: train's default)."""
    from ktnas.engine.train.network import network_layout

    name = space if isinstance(space, str) else space.name
    from ktnas.engine.spaces import get_space

    probe = get_space(name).cost_probes()[0]
    lay = network_layout(probe, layers=layers, channels=channels, reductions=reductions,
                         in_channels=info["in_channels"], in_size=info["resolution"])
    build = dict(num_classes=int(info["num_classes"]), layers=lay.layers, channels=lay.channels,
                 reductions=list(lay.reductions), in_channels=int(info["in_channels"]), in_size=int(info["resolution"]))
    if input_shape is None:
        input_shape = (3, info["image_size"], info["image_size"])
    return Target(name, build, str(info["stem"]), int(info["image_size"]), tuple(int(v) for v in input_shape),
                  int(batch))


def store_target(store, space, *, layers=None, channels=None, reductions=None, batch: int = 1,
                 input_shape=None) -> Target:
    """The Target of the model ``ktnas train`` builds on the feature store ``store`` (a path or an open store);
    the raw image shape by default that of the store's data set's images."""
    from ktnas.cache.store import open_store
    from ktnas.engine.data import feature_info

    store = open_store(store) if isinstance(store, (str, Path)) else store
    info = feature_info(store)
    if input_shape is None:
        from ktnas.engine.train.export import image_shape

        input_shape = image_shape(store.attrs.get("dataset"), info["image_size"], "the store's data set")
    return target_for(space, info, layers=layers, channels=channels, reductions=reductions, batch=batch,
                      input_shape=input_shape)


def environment(runtime: str, device: str, threads: int | None) -> dict:
    """Where a table was measured: runtime and its version, device (CPU model or GPU name), threads, torch."""
    env = dict(runtime=runtime, device=str(device), threads=threads, torch=torch.__version__,
               python=platform.python_version(), machine=platform.machine())
    if str(device).startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env["device_name"] = _cpu_name()
    if runtime == "onnxruntime":
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def op_key(op: str, x: tuple, y: tuple) -> str:
    """``sep_conv_3x3 32x16x16->32x16x16``: an op at one input and output shape (batch left out)."""
    return f"{op} {'x'.join(map(str, x))}->{'x'.join(map(str, y))}"


def op_shapes(space, genotype, build: dict) -> list[tuple[str, int, str, str, str]]:
    """(cell type, edge, op, key, module path) of every op of ``genotype``'s network, shapes read on the meta
    device."""
    from ktnas.engine.profile.cost import cell_ops, meta_network, network_input

    net = meta_network(space, genotype, build)
    ops = list(cell_ops(space, net, genotype))
    shapes: dict[str, tuple] = {}
    hooks = [net.get_submodule(path).register_forward_hook(
        lambda m, i, o, path=path: shapes.__setitem__(path, (tuple(i[0].shape[1:]), tuple(o.shape[1:]))))
        for *_, path in ops]
    try:
        with torch.no_grad():
            net.eval()(network_input(build))
    finally:
        for h in hooks:
            h.remove()
    return [(t, edge, op, op_key(op, *shapes[path]), path) for _, t, edge, op, path in ops]


def model_for(target: Target, genotype) -> nn.Module:
    """The exported model of ``genotype`` at ``target`` (frozen stem + evaluation network), random weights: the
    latency of a model does not depend on its weights."""
    from ktnas.cache.stems import get_stem
    from ktnas.engine.train.network import KtnasModel, build_network

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stem = get_stem(target.stem, "none", target.image_size)
    return KtnasModel(stem, build_network(genotype, **target.build)).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ measuring
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
        from ktnas.engine.profile.latency import runner

        module = module.eval().requires_grad_(False)
        if self.runtime == "onnxruntime":
            from ktnas.engine.train.export import write_onnx

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
        from ktnas.engine.profile.latency import median_ms

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


# ------------------------------------------------------------------------------------------- the table
@dataclass
class LatencyTable:
    """Measured op latencies (ms, by :func:`op_key`), the fixed part and the calibration of one target."""
    target: Target
    environment: dict
    ops: dict = field(default_factory=dict)
    fixed_ms: float = 0.0
    stem_ms: float | None = None
    scales: dict = field(default_factory=dict)  # {op: scale of its measured ms within a network}
    calibration: list = field(default_factory=list)  # [{genotype, measured_ms, ops_ms: {op: ms}}]
    check: list = field(default_factory=list)  # [{genotype, predicted_ms, measured_ms}], held out
    created: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["target"] = self.target.to_json()
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **d}

    def save(self, path) -> Path:
        from ktnas.engine.runs import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path) -> "LatencyTable":
        hint = "write one with `ktnas bench latency`"
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise KtnasError(f"{path}: no such latency table; {hint}") from None
        except (OSError, ValueError) as e:
            raise KtnasError(f"{path}: not a readable latency table ({type(e).__name__}); {hint}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise KtnasError(f"{path}: not a ktnas latency table (no format '{FORMAT}'); {hint}")
        if d.get("format_version") != FORMAT_VERSION:
            raise KtnasError(f"{path}: latency table format {d.get('format_version')!r}, this version reads "
                             f"{FORMAT_VERSION}; measure it again with `ktnas bench latency`")
        return cls(Target.from_json(d["target"]), d["environment"], dict(d["ops"]), float(d["fixed_ms"]),
                   d.get("stem_ms"), dict(d.get("scales", {})), list(d.get("calibration", [])),
                   list(d.get("check", [])), d.get("created", ""))

    def require(self, target: Target, path="the latency table") -> None:
        """One-line KtnasError when this table describes another network than ``target``."""
        mine, theirs = self.target.to_json(), target.to_json()
        for k in mine:
            if k == "build":
                diff = [f"{b}={mine[k].get(b)} (needs {theirs[k].get(b)})" for b in theirs[k]
                        if mine[k].get(b) != theirs[k].get(b)]
            else:
                diff = [f"{k}={mine[k]} (needs {theirs[k]})"] if mine[k] != theirs[k] else []
            if diff:
                raise KtnasError(f"{path} was measured for another network: {', '.join(diff)}; measure one for "
                                 f"this network with `ktnas bench latency` at the same layout")


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
    table.created = table.created or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
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


def _groups(items: list, size: int = GROUP) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def ops_sums(table: LatencyTable, genotype) -> dict[str, float]:
    """{op: the sum of its measured latencies over ``genotype``'s network} (one-line KtnasError for a shape the
    table lacks)."""
    from ktnas.engine.spaces import space_of

    out: dict[str, float] = {}
    for _, _, op, key, _ in op_shapes(space_of(genotype), genotype, table.target.build):
        if key not in table.ops:
            raise KtnasError(f"the latency table has no measurement of {key}: measure one for this network with "
                             "`ktnas bench latency`")
        out[op] = out.get(op, 0.0) + table.ops[key]
    return out


def fit(calibration: list[dict], ops) -> tuple[float, dict[str, float]]:
    """(fixed ms, {op: scale}) of ``measured = fixed + Σ_op scale_op · Σ op ms`` over the calibration models, least
    squares with every scale >= 0 (an op measured alone pays a call's overhead and runs from cold buffers; within
    a network it shares them: one scale per op, read in context). Ops no calibration model holds keep scale 1."""
    if not calibration:
        return 0.0, {}
    present = [op for op in ops if any(c["ops_ms"].get(op) for c in calibration)]
    X = np.array([[1.0] + [c["ops_ms"].get(op, 0.0) for op in present] for c in calibration])
    y = np.array([c["measured_ms"] for c in calibration])
    active = list(range(X.shape[1]))
    while True:  # non-negative least squares by elimination (a handful of columns)
        coef = np.zeros(X.shape[1])
        coef[active] = np.linalg.lstsq(X[:, active], y, rcond=None)[0]
        negative = [j for j in active if j > 0 and coef[j] < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda j: coef[j]))
    return float(coef[0]), {op: float(coef[k + 1]) for k, op in enumerate(present)}


def check_table(table: LatencyTable, timer: Timer, n: int, *, seed: int = 0, progress: bool = True,
                save=None) -> list[dict]:
    """Predicted against measured latency of ``n`` random models (held out from the calibration); rows appended
    to ``table.check`` as they are measured (resumable through ``save``)."""
    from ktnas.engine.runs import progress as bar
    from ktnas.engine.spaces import genotype_from_json, get_space

    space, model = get_space(table.target.space), LatencyModel(table)
    rng = np.random.default_rng([seed, 2])
    genotypes = [space.random_genotype(rng) for _ in range(n)]
    with bar(total=n, initial=min(len(table.check), n), desc="latency: check", enabled=progress) as pb:
        for group in _groups(genotypes[len(table.check):]):
            for g, ms in zip(group, timer.models(table.target, group)):
                table.check.append(dict(genotype=g.to_json(), predicted_ms=model.predict(g), measured_ms=ms))
            pb.update(len(group))
            if save:
                save(table)
    rows = table.check[:n]
    assert all(genotype_from_json(r["genotype"]).to_json() == g.to_json() for r, g in zip(rows, genotypes))
    return rows


def errors(rows: list[dict]) -> dict:
    """The error distribution of predicted against measured latency (relative, %)."""
    e = np.array([100.0 * (r["predicted_ms"] / r["measured_ms"] - 1) for r in rows])
    a = np.abs(e)
    return dict(n=len(rows), median_abs_pct=float(np.median(a)), p90_abs_pct=float(np.quantile(a, 0.9)),
                max_abs_pct=float(a.max()), within_10_pct=float(100.0 * (a <= 10).mean()),
                mean_pct=float(e.mean()))


# ------------------------------------------------------------------------------------------- the model
class LatencyModel:
    """A table's prediction as ``fixed + Σ_cell types Σ_edges table[edge, op]`` (ms; ``table[t]`` summed over the
    cells of type t), laid out as :class:`~ktnas.engine.profile.cost.CostModel`'s weights."""

    def __init__(self, table: LatencyTable):
        from ktnas.engine.spaces import get_space

        self.source, self.space = table, get_space(table.target.space)
        n_edges, n_ops = len(self.space.edge_list()), len(self.space.ops)
        self.table = {t: np.zeros((n_edges, n_ops)) for t in self.space.cell_types}
        seen: dict[tuple, str] = {}
        for g in self.space.cost_probes():
            for t, edge, op, key, path in op_shapes(self.space, g, table.target.build):
                cell = path.split(".")[1]
                if (t, edge, op, cell) in seen:
                    continue
                seen[(t, edge, op, cell)] = key
                if key not in table.ops:
                    raise KtnasError(f"the latency table has no measurement of {key}: measure one for this "
                                     "network with `ktnas bench latency`")
                self.table[t][edge, self.space.ops.index(op)] += table.scales.get(op, 1.0) * table.ops[key]
        self.fixed = float(table.fixed_ms)

    def predict(self, genotype) -> float:
        """Predicted ms of ``genotype``'s exported model."""
        total = self.fixed
        for t in self.table:
            for edge, op in self.space.cell_edges(genotype, t):
                total += float(self.table[t][edge, self.space.ops.index(op)])
        return total
