"""Latency of a genotype's exported model on a target runtime, predicted from a look-up table of its ops.

ProxylessNAS' and FBNet's latency model: every op a space may place on an edge is measured on its own, at every
input shape, stride and width the evaluation network gives it (``sep_conv_3x3 32x16x16->32x16x16``), on the target
runtime (ONNX Runtime or PyTorch, CPU or CUDA) and batch. A network's latency is then
``fixed + Σ_cells Σ_edges scale_op · ms(op, shape)``: ``fixed`` is what does not depend on the genotype (the frozen
stem, each cell's input convolutions, the sums and concatenations of its nodes, the classifier, each op's call
overhead, which every network pays as often), and one scale per op carries what an op timed alone does not show
within a network; both are fitted (:func:`fit`) on whole models measured at calibration. :class:`LatencyModel` lays
the table out as :class:`~ktnas.engine.profile.cost.CostModel` lays out weights (an [edges, ops] array per cell
type, summed over the cells of that type), so a budgeted search weighs expected latency as it weighs expected
weights. The measuring is :mod:`ktnas.engine.profile.latency`'s.

A table is a JSON file (:class:`LatencyTable`): the ops' medians, the fixed part and scales, the calibration and
the held-out check if one ran, keyed by the environment it was measured in (runtime, device, threads, versions)
and by the network it describes (space, layout, frozen stem, raw image shape, batch); a budget refuses a table
measured for another network in one line."""
from __future__ import annotations

import json
import platform
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ktnas.cache.errors import KtnasError

FORMAT = "ktnas-latency-table"
FORMAT_VERSION = 1
RUNTIMES = ("onnxruntime", "torch")


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
        from ktnas.engine.data import image_shape

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
