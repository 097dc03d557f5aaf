"""``ktnas evolve --objectives accuracy,latency``: the Pareto front of validation accuracy against the trained
model's costs (weights, multiply-adds, predicted latency), its picture and its lines."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ktnas.cache.errors import KtnasError
from ktnas.engine.runs import atomic_write
from ktnas.engine.search.budget import KEYS, pareto


def cost_objectives(text: str) -> tuple[str, ...]:
    """The costs among ``--objectives`` (accuracy first, then any of params, flops, latency); one-line KtnasError
    otherwise."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names or names[0] != "accuracy" or len(set(names)) < len(names) or not set(names[1:]) <= set(KEYS):
        raise KtnasError(f"--objectives {text!r}: give accuracy, then any of {', '.join(KEYS)} (e.g. "
                         "accuracy,latency)")
    return tuple(names[1:])


def pareto_front(rows: list[dict], costs: tuple) -> list[int]:
    """Indices of the rows no other row beats in validation accuracy and every cost of ``costs`` (keys of their
    ``deploy`` values), most accurate first; of identical rows the first."""
    cost = np.array([[float(r["deploy"][k]) for k in costs] for r in rows]).reshape(len(rows), len(costs))
    return [int(i) for i in pareto(cost, np.array([float(r["val_acc"]) for r in rows]))]


UNITS = {"params": ("weights (M)", 1e-6), "flops": ("multiply-adds per image (M)", 1e-6),
         "latency": ("predicted latency (ms)", 1.0)}


def plot_front(history: list[dict], front: list[dict], objectives: tuple, path, title: str = "") -> None:
    """Validation accuracy against each cost objective of every candidate (points), the Pareto front marked and
    joined (one panel per cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(objectives), figsize=(6 * len(objectives), 4.5), squeeze=False)
    on = {r["index"] for r in front}
    for ax, key in zip(axes[0], objectives):
        label, scale = UNITS[key]
        x = np.array([r["deploy"][key] * scale for r in history])
        y = np.array([r["val_acc"] for r in history])
        ax.scatter(x, y, s=12, color="C0", alpha=0.5, label=f"candidates ({len(history)})")
        fx = np.array([r["deploy"][key] * scale for r in front])
        fy = np.array([r["val_acc"] for r in front])
        o = np.argsort(fx, kind="stable")
        ax.step(fx[o], fy[o], where="post", color="C3", lw=1.2)
        ax.scatter(fx, fy, s=40, facecolors="none", edgecolors="C3", lw=1.5,
                   label=f"Pareto front ({len(on)})" + (" over all objectives" if len(objectives) > 1 else ""))
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


def front_text(summary: dict) -> str:
    """The front of an evolve run's summary, one line per candidate."""
    costs = summary["objectives"][1:]
    lines = [f"Pareto front ({len(summary['front'])} candidates; {summary['out']}/front.json, pareto.png):"]
    for r in summary["front"]:
        cost = ", ".join(f"{UNITS[k][0].split(' (')[0]} {r['deploy'][k] * UNITS[k][1]:.3f}" for k in costs)
        lines.append(f"  #{r['index']}: {r['val_acc']:.2f}%, {cost}")
    return "\n".join(lines)
