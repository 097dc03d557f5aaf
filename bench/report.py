"""What every benchmark writes: ``results.json``, ``results.md`` (machine, date, command, table) and a PNG chart.

A benchmark hands back a :class:`Report`: its rows (plain dicts), the columns of its markdown table, notes that
say how to read the numbers, and a function that draws its chart on a matplotlib ``Axes``.
"""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ktnas.cache.errors import KtnasError


@dataclass
class Column:
    """One column of the markdown table: the row key, its header and how a value is printed (``key`` None:
    ``fmt`` gets the whole row, for cells made of several values)."""

    key: str | None
    header: str
    fmt: Callable[[object], str] = str

    def cell(self, row: dict) -> str:
        return self.fmt(row if self.key is None else row[self.key])


@dataclass
class Report:
    """The outcome of one benchmark run, ready for :func:`write_report`."""

    name: str
    title: str
    rows: list[dict]
    columns: list[Column]
    chart: Callable  # chart(ax, rows): draws on a matplotlib Axes (a list of chart_panels Axes when > 1)
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    chart_panels: int = 1  # side-by-side Axes handed to ``chart``


def rate(v) -> str:
    """A rate with thousands separators (``12,345``), one decimal below 100."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def mean_and_sd(vals) -> tuple[float | None, float | None]:
    """The mean and the sample standard deviation (ddof 1) of ``vals`` without its Nones; None where undefined."""
    vals = [v for v in vals if v is not None]
    return (float(np.mean(vals)) if vals else None), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def mean_sd(key: str, fmt: Callable[[float], str]) -> Callable[[dict], str]:
    """A cell ``mean ± sd`` of row ``key`` and ``key_sd`` (the sd only when the row has one: several seeds)."""
    def cell(r: dict) -> str:
        v, sd = r[key], r.get(f"{key}_sd")
        return "-" if v is None else fmt(v) + ("" if sd is None else f" ± {fmt(sd).lstrip('+')}")
    return cell


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """Where the numbers come from: device name, CPU model and count, library versions, date."""
    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return dict(device=str(dev), device_name=gpu or cpu_model(), cpu=cpu_model(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform(), date=datetime.now().astimezone().isoformat(timespec="seconds"))


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_report(out, report: Report, command: str) -> str:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out``; return the markdown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(report.device)
    data = dict(benchmark=report.name, command=command, machine=machine, notes=report.notes,
                rows=[{k: _jsonable(v) for k, v in r.items()} for r in report.rows])
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")

    md = [f"# {report.title}", "",
          f"- machine: {machine['device_name']} ({machine['device']}), {machine['cpu_count']} CPUs "
          f"({machine['cpu']}), torch {machine['torch']} ({machine['torch_threads']} threads), "
          f"Python {machine['python']}",
          f"- date: {machine['date']}",
          f"- command: `{command}`", "",
          markdown_table(report.rows, report.columns), ""]
    md += [f"- {n}" for n in report.notes]
    text = "\n".join(md).rstrip() + "\n"
    (out / "results.md").write_text(text)

    panels = report.chart_panels
    fig = Figure(figsize=(8 if panels == 1 else 6.5 * panels, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    report.chart(axes if panels == 1 else list(axes), report.rows)
    title = (f"{report.title}\n{machine['device_name']}, {machine['cpu_count']} CPUs, "
             f"torch {machine['torch']}, {machine['date'][:10]}")
    if panels == 1:
        axes.set_title(title, fontsize=9)
    else:
        fig.suptitle(title, fontsize=9)
    fig.savefig(out / "results.png", dpi=120)
    return text


def budget_id(values: dict) -> str:
    """The folder name of a benchmark's runs at one budget (``values``: what every run's result depends on), so
    that another budget never reuses them: ``budget-`` and the first 10 hex digits of their JSON's sha256."""
    import hashlib

    return "budget-" + hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def names(value, allowed, flag: str) -> tuple[str, ...]:
    """A comma-separated string (or a sequence) of names checked against ``allowed``, duplicates dropped, in
    order; a one-line KtnasError naming ``flag`` otherwise."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise KtnasError(f"{'unknown ' + repr(bad[0]) if bad else 'nothing'} in {flag}: use a comma-separated "
                         f"subset of {','.join(allowed)}")
    return tuple(dict.fromkeys(items))


def positive(name: str, v, low: int = 1) -> None:
    """``v`` is an integer >= ``low`` (not a bool); a one-line KtnasError naming the flag of ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise KtnasError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}: pass a valid value")
