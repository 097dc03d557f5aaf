"""``ktnas bench latency``: a latency look-up table per search space on a target runtime, and how well it predicts.

For each space of ``--space``, every op is measured on its own at every input shape, stride and width the
evaluation network on ``--features`` gives it (the network ``ktnas train`` builds at ``--layers``/``--channels``),
on ``--runtime`` (ONNX Runtime or PyTorch) on ``--device`` at ``--batch``; the fixed part and each op's scale
within a network are fitted on the space's probe models and ``--calibrate`` random ones
(:mod:`ktnas.engine.profile.latency_table`). The table is written to ``--out``/latency-table-SPACE.json, the file
``ktnas search --budget latency=...`` and ``ktnas evolve --budget latency=...`` take through ``--latency-table``.

Then ``--check`` random architectures, held out from the calibration, are exported whole (frozen stem + cells, as
``ktnas export`` writes them) and measured: the report gives the distribution of the prediction's error and a PNG
of predicted against measured latency. A rerun with the same ``--out`` goes on from what is measured.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ktnas.cache.errors import KtnasError
from ktnas.engine.profile.latency import Timer, check_table, measure_table
from ktnas.engine.profile.latency_table import RUNTIMES, LatencyTable, environment, errors, store_target
from ktnas.engine.spaces import SPACES

from .report import Column, Report

HELP = "per-op latency table of a space on a runtime (the --budget latency=... file), checked on whole models"
DEMO_STORE = "runs/fashion-mnist_mobilenet_v2-features.3_64.zarr"
COMPARED = ("runtime", "device", "threads", "device_name", "torch", "onnxruntime")


def add_arguments(p) -> None:
    p.add_argument("--features", default=DEMO_STORE, help="feature store whose stem and data the models run on "
                   "(default: the demo's, %(default)s)")
    p.add_argument("--space", default="darts,nb201", help="comma-separated search spaces (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="cells of the trained network (default: ktnas train's)")
    p.add_argument("--channels", type=int, default=None, help="its first cells' width (default: ktnas train's)")
    p.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES, help="target runtime (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="images per run (default: %(default)s)")
    p.add_argument("--input-shape", default=None, metavar="C,H,W", help="raw image shape (default: the store's data "
                   "set's)")
    p.add_argument("--calibrate", type=int, default=5, help="random models beside the probe models that fit the "
                   "fixed part and the op scales (default: %(default)s)")
    p.add_argument("--check", type=int, default=50, help="random models, held out, measured against the "
                   "prediction (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration and check models (default: 0)")


def table_path(work_dir, space: str) -> Path:
    return Path(work_dir) / f"latency-table-{space}.json"


def _resume(path: Path, target, env: dict) -> LatencyTable | None:
    """The table measured so far in ``path`` for the same target and environment (None: none there)."""
    if not path.exists():
        return None
    table = LatencyTable.load(path)
    table.require(target, path)
    diff = [k for k in COMPARED if table.environment.get(k) != env.get(k)]
    if diff:
        raise KtnasError(f"{path} was measured elsewhere ({', '.join(f'{k}={table.environment.get(k)}' for k in diff)}"
                         f"): give another --out to measure here")
    return table


def report(args, work_dir) -> Report:
    from ktnas.engine.train.export import input_shape as parse_shape

    shape = parse_shape(None, args.input_shape) if args.input_shape else None
    spaces = [s for s in args.space.split(",") if s]
    for s in spaces:
        if s not in SPACES:
            raise KtnasError(f"unknown --space {s!r}: use {', '.join(SPACES)}")
    if args.calibrate < 0 or args.check < 0:
        raise KtnasError("--calibrate and --check must be >= 0")
    timer = Timer(args.runtime, args.device, args.batch, threads=args.threads)
    rows, checks = [], {}
    try:
        env = environment(args.runtime, args.device, args.threads)
        for space in spaces:
            target = store_target(args.features, space, layers=args.layers, channels=args.channels,
                                  batch=args.batch, input_shape=shape)
            path = table_path(work_dir, space)
            table = _resume(path, target, env)
            table = measure_table(target, timer, calibrate=args.calibrate, seed=args.seed, table=table,
                                  save=lambda t: t.save(path))
            table.save(path)
            check = check_table(table, timer, args.check, seed=args.seed, save=lambda t: t.save(path))
            checks[space] = check
            rows.append(dict(space=space, network=target.describe(), ops=len(table.ops),
                             calibration=len(table.calibration), stem_ms=table.stem_ms, table=str(path),
                             measured_min=min((r["measured_ms"] for r in check), default=None),
                             measured_max=max((r["measured_ms"] for r in check), default=None),
                             **(errors(check) if check else dict(n=0))))
            _write_csv(Path(work_dir) / f"check-{space}.csv", check)
    finally:
        timer.close()
    notes = [f"Runtime {args.runtime} on {env['device_name']} ({args.device}), batch {args.batch}, "
             f"{args.threads or 'default'} threads; torch {env['torch']}"
             + (f", onnxruntime {env['onnxruntime']}" if "onnxruntime" in env else "") + ".",
             "Predicted: the table's fixed part + each op's scale x its measured latency, summed over the cells; "
             "measured: the whole exported model (frozen stem + cells), median over interleaved rounds. The check's "
             "models are held out from the calibration; each one's figures are in check-SPACE.csv.",
             "Pass a table to `ktnas search` or `ktnas evolve` with --budget latency=... --latency-table FILE."]
    return Report("latency", "ktnas bench latency: the latency model against measured models", rows, COLUMNS,
                  lambda ax, rows: _chart(ax, checks), device=args.device, notes=notes)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["genotype", "predicted_ms", "measured_ms", "error_pct"])
        for r in rows:
            from ktnas.engine.spaces import genotype_from_json, genotype_str

            w.writerow([genotype_str(genotype_from_json(r["genotype"])), f"{r['predicted_ms']:.4f}",
                        f"{r['measured_ms']:.4f}", f"{100 * (r['predicted_ms'] / r['measured_ms'] - 1):+.2f}"])


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


COLUMNS = [Column("space", "space"), Column("network", "network"), Column("ops", "op shapes"),
           Column("calibration", "calibration models"), Column("n", "checked models"),
           Column(None, "measured ms (min-max)",
                  lambda r: f"{_ms(r.get('measured_min'))}-{_ms(r.get('measured_max'))}"),
           Column(None, "median abs error %", lambda r: _pct(r.get("median_abs_pct"))),
           Column(None, "p90 abs error %", lambda r: _pct(r.get("p90_abs_pct"))),
           Column(None, "max abs error %", lambda r: _pct(r.get("max_abs_pct"))),
           Column(None, "within ±10 %", lambda r: _pct(r.get("within_10_pct"))),
           Column("stem_ms", "stem ms", _ms)]


def _chart(ax, checks: dict) -> None:
    import numpy as np

    top = 0.0
    for (space, rows), marker in zip(checks.items(), "os^v"):
        if not rows:
            continue
        m = np.array([r["measured_ms"] for r in rows])
        p = np.array([r["predicted_ms"] for r in rows])
        within = 100 * float((np.abs(p / m - 1) <= 0.1).mean())
        ax.scatter(m, p, s=14, marker=marker, alpha=0.75, label=f"{space} ({len(rows)} models, {within:.0f}% "
                   "within ±10%)")
        top = max(top, float(m.max()), float(p.max()))
    line = np.array([0.0, top * 1.05])
    ax.plot(line, line, color="black", lw=0.8, label="predicted = measured")
    ax.fill_between(line, line * 0.9, line * 1.1, color="grey", alpha=0.2, label="±10%")
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("measured latency of the exported model (ms)")
    ax.set_ylabel("predicted from the op table (ms)")
    ax.legend(fontsize=7, loc="upper left")
