"""Pictures of a search: architecture-weight evolution and cells drawn as DAGs (matplotlib, PNG)."""
from __future__ import annotations

import math

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_alphas(alpha_hist: dict, ops, path) -> dict:
    """softmax(alpha) per op, averaged over edges, against the epoch; one panel per cell type, with the uniform
    weight 1/K drawn and a y axis from 0 to at least 3/K, so weights that stayed near uniform look flat (an axis
    fitted to the data would magnify noise of 1e-4 into trends). Returns ``{cell type: (ymin, ymax)}``."""
    plt = _pyplot()
    types = list(dict.fromkeys(k.rsplit("_e", 1)[0] for k in alpha_hist))
    fig, axes = plt.subplots(1, len(types), figsize=(5.5 * len(types), 4), squeeze=False)
    limits, uniform = {}, 1 / len(ops)
    for ax, t in zip(axes[0], types):
        keys = sorted(k for k in alpha_hist if k.rsplit("_e", 1)[0] == t)
        epochs = [int(k.rsplit("_e", 1)[1]) + 1 for k in keys]
        w = np.stack([np.exp(a - a.max(-1, keepdims=True)) / np.exp(a - a.max(-1, keepdims=True)).sum(-1,
                      keepdims=True) for a in (alpha_hist[k] for k in keys)]).mean(1)
        for j, op in enumerate(ops):
            ax.plot(epochs, w[:, j], marker="o", ms=3, label=op)
        ax.axhline(uniform, color="0.3", ls="--", lw=1, label=f"uniform 1/{len(ops)}")
        ax.set_ylim(0, max(3 * uniform, 1.1 * float(w.max())))
        ax.set(title=f"{t} cell", xlabel="epoch", ylabel="mean softmax(alpha)")
        ax.grid(alpha=0.3)
        limits[t] = ax.get_ylim()
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return limits


def _arrow(ax, p0, p2, rad: float, op, radius: float) -> float:
    """One edge from circle ``p0`` to circle ``p2`` (arc3 curvature ``rad``), labelled ``op`` (None: dashed);
    returns the height of its midpoint."""
    from matplotlib.patches import FancyArrowPatch

    d = p2 - p0
    ctrl = (p0 + p2) / 2 + rad * np.array([d[1], -d[0]])  # matplotlib's arc3 control point
    s0 = p0 + radius * (ctrl - p0) / np.linalg.norm(ctrl - p0)  # start and end on the circles
    s2 = p2 + radius * (ctrl - p2) / np.linalg.norm(ctrl - p2)
    ax.add_patch(FancyArrowPatch(tuple(s0), tuple(s2), arrowstyle="-|>", mutation_scale=12, shrinkA=0, shrinkB=0,
                                 connectionstyle=f"arc3,rad={rad}", color="0.55" if op is None else "0.1",
                                 linestyle="--" if op is None else "-", lw=1.1))
    mid = (p0 + p2) / 4 + ctrl / 2  # the curve at t = 1/2
    if op is not None:
        angle = math.degrees(math.atan2(d[1], d[0])) if rad == 0 else 0.0
        angle = angle - 180 if angle > 90 else angle + 180 if angle < -90 else angle
        ax.text(*mid, op, fontsize=7, ha="center", va="center", rotation=angle, rotation_mode="anchor",
                bbox=dict(boxstyle="round,pad=0.12", fc="white", ec="none", alpha=0.85), zorder=2)
    return abs(mid[1])


def draw_dag(pos: dict, names: list[str], edges, path, *, title: str, io_nodes=(), curved: bool = False) -> None:
    """A cell as a DAG: ``pos`` {node: (x, y)}, ``edges`` (src, dst, op or None), ``io_nodes`` coloured apart;
    ``curved`` bends edges that skip nodes."""
    from matplotlib.patches import Circle

    plt = _pyplot()
    radius, top = 0.32, 0.0
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(pos), 4.4))
    for a, b, op in edges:
        rad = 0.3 * (b - a - 1) * (-1) ** a if curved else 0.0
        top = max(top, _arrow(ax, np.array(pos[a], float), np.array(pos[b], float), rad, op, radius))
    for i, (x, y) in pos.items():
        ax.add_patch(Circle((x, y), radius, fc="#f9cb9c" if i in io_nodes else "#cfe2f3", ec="0.2", zorder=3))
        ax.text(x, y, f"${names[i]}$" if "_" in names[i] else names[i], ha="center", va="center", fontsize=9,
                zorder=4)
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(min(min(ys), -top) - 0.6, max(max(ys), top) + 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
