"""``ktnas bench search``: its report (table columns, bar chart) and command-line arguments."""
from __future__ import annotations

from ktnas.cache.stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM

from .report import Column, Report, rate
from ktnas.engine.algorithms import algorithm_variants

from .search import CASES, FULL, QUICK, bench_search

HELP = ("median search-step time, samples/s and peak memory: classic DARTS against KT-NAS (stem on the fly, "
        "cached features from disk or memory, fused kernels, CUDA graph)")


# ---------------------------------------------------------------------------------------------------- report
def _mib(v) -> str:
    return f"{v / 2**20:,.0f}" if v is not None else "-"


def _mem_cell(r) -> str:
    if r["skipped"] is not None:
        return "-"
    return _mib(r["peak_mem_bytes"]) + ("" if r["device"].startswith("cuda") else
                                        f" (+{_mib(r['mem_increase_bytes'])})")


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _note(r) -> str:
    if r["skipped"] is not None:
        return "skipped: " + r["skipped"]
    parts = [f"loss {r['loss']:.3f}"]
    if r.get("stream_overhead") is not None:
        parts.append(f"streaming {100 * r['stream_overhead']:+.1f}% step time over memory")
    return ", ".join(parts)


COLUMNS = [Column("space", "space"), Column("variant", "algo"), Column("batch", "batch"),
           Column("config", "config"), Column("source", "input"),
           Column("step_ms", "step ms (median)", lambda v: "-" if v is None else f"{v:,.1f}"),
           Column("samples_per_s", "samples/s", lambda v: "-" if v is None else rate(v)),
           Column("speedup", "samples/s vs baseline", _x),
           Column(None, "peak mem MiB", _mem_cell), Column("mem_ratio", "mem vs baseline", _x),
           Column(None, "weights / cells", lambda r: "-" if r.get("params") is None
                  else f"{r['params']:,} / {r['cells']}"),
           Column(None, "note", _note)]

COLORS = {("baseline", "images"): "tab:gray", ("stem-on-the-fly", "images"): "tab:orange",
          ("cached", "disk"): "tab:blue", ("cached", "memory"): "tab:cyan", ("cached-fused", "disk"): "tab:green",
          ("cached-fused-graph", "disk"): "tab:red", ("cached-compiled", "disk"): "tab:olive"}


def _kind_label(kind) -> str:
    return f"{kind[0]} ({kind[1]})" if kind[0] == "cached" else kind[0]


def _chart(axes, rows) -> None:
    """Left: samples/s; right: peak memory (CPU: the RSS increase); bars per configuration, grouped by (space,
    algorithm, batch); a skipped configuration is named at its place."""
    groups = list(dict.fromkeys((r["space"], r["variant"], r["batch"]) for r in rows))
    kinds = list(dict.fromkeys((r["config"], r["source"]) for r in rows))
    width = 0.8 / max(1, len(kinds))
    cpu = bool(rows) and not rows[0]["device"].startswith("cuda")
    for ax, key, ylabel in ((axes[0], "samples_per_s", "samples/s (median step)"),
                            (axes[1], "mem_increase_bytes" if cpu else "peak_mem_bytes",
                             "RSS increase MiB" if cpu else "peak memory MiB (max_memory_allocated)")):
        for k, kind in enumerate(kinds):
            xs, hs = [], []
            for g, grp in enumerate(groups):
                for r in rows:
                    if (r["space"], r["variant"], r["batch"]) == grp and (r["config"], r["source"]) == kind:
                        x = g + (k - (len(kinds) - 1) / 2) * width
                        if r["skipped"] is None:
                            xs.append(x)
                            hs.append(r[key] / (1 if key == "samples_per_s" else 2**20))
                        else:
                            ax.text(x, 0, f" {_kind_label(kind)}: skipped", rotation=90, ha="center", va="bottom",
                                    fontsize=6, color="0.35")
            if xs:
                ax.bar(xs, hs, width, color=COLORS.get(kind, "tab:purple"), label=_kind_label(kind))
        ax.set_xticks(range(len(groups)), [f"{s}\n{a}\nbatch {b}" for s, a, b in groups], fontsize=7)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="best")


def add_arguments(p) -> None:
    p.add_argument("--features", default=None, metavar="STORE",
                   help="a store of stem features (default: build one into --out from --dataset/--stem/...)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--quick", action="store_true",
                   help=f"a few minutes on a CPU: --algos {','.join(QUICK['algos'])} --spaces "
                        f"{','.join(QUICK['spaces'])} --batch-size {QUICK['batch_size']} --warmup {QUICK['warmup']} "
                        f"--steps {QUICK['steps']} unless given")
    p.add_argument("--algos", default=None,
                   help=f"comma-separated subset of {','.join(algorithm_variants())} (default: all; --quick: "
                        f"{','.join(QUICK['algos'])})")
    p.add_argument("--spaces", default=None, help="comma-separated subset of the registered spaces (default: all; "
                                                  "--quick: "
                                                  "darts)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated subset of {','.join(CASES)} (default: all but cached-compiled; "
                        f"cached-memory is the 'cached' row with source memory)")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps; the median counts (default: "
                                                           f"{FULL['steps']}; --quick: {QUICK['steps']})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default: {FULL['warmup']}; "
                                                            f"--quick: {QUICK['warmup']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"one batch for every algorithm (default: the papers': darts 64, pcdarts 256, gdas 64; "
                        f"--quick: {QUICK['batch_size']})")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="autocast (default: fp32)")
    p.add_argument("--recompute", default=None, choices=("none", "edge", "cell"),
                   help="ktnas search --recompute of the KT-NAS configurations (default: search's; the baseline "
                        "recomputes nothing, as DARTS' own code)")
    p.add_argument("--compile-backend", default="inductor",
                   help="cached-compiled: torch.compile's backend (default: %(default)s; aot_eager compiles fast)")
    p.add_argument("--memory-cap", default=None, metavar="SIZE",
                   help="CUDA: cap the process's memory (set_per_process_memory_fraction), e.g. 2GiB; a configuration "
                        "that runs out is skipped, with the largest batch that fits")
    p.add_argument("--samples", type=int, default=None,
                   help="train samples used, split in half (default: enough for distinct batches every step)")
    p.add_argument("--seed", type=int, default=0, help="network initialisation and batch order (default: 0)")
    g = p.add_argument_group("building the store (without --features)")
    g.add_argument("--dataset", default="fashion-mnist", help="images (train split) (default: %(default)s)")
    g.add_argument("--stem", default=DEFAULT_STEM, help="ARCH:CUT (default: %(default)s)")
    g.add_argument("--weights", default="imagenet", help="imagenet | none | PATH (default: %(default)s)")
    g.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                   help="stem input size (default: %(default)s)")


def report(args, work_dir=None) -> Report:
    """Run :func:`bench_search` with the CLI's arguments."""
    notes: list[str] = []
    rows = bench_search(args.features, samples=args.samples, dataset=args.dataset, stem=args.stem,
                        weights=args.weights, image_size=args.image_size, device=args.device, quick=args.quick,
                        algos=args.algos, spaces=args.spaces, configs=args.configs, steps=args.steps,
                        warmup=args.warmup, batch_size=args.batch_size, precision=args.precision,
                        memory_cap=args.memory_cap, seed=args.seed, work_dir=work_dir, notes=notes,
                        recompute=args.recompute, compile_backend=args.compile_backend)
    r0 = rows[0]
    notes += [f"each configuration: a freshly seeded network, {r0['warmup']} untimed step(s), then {r0['steps']} "
              "timed step(s) (the median counts); a step = fetching a training and a validation batch (+ the frozen "
              "stem for stem-on-the-fly) + ktnas search's own step (SearchRun.search_step), CUDA synchronised; "
              "configurations run one after the other, after one discarded step (one-time costs)",
              "baseline: --stem none, classic network on 32x32 images (host memory, copied per batch); "
              "stem-on-the-fly: the store's frozen stem on the raw images (host memory, copied per batch); cached "
              "(disk): FeatureLoader streaming the store (page cache warm); cached (memory): FeatureLoader "
              "in_memory=True (GPU memory on CUDA); compiled: --capture compile (torch.compile, its compile in the "
              "untimed steps); fused: --kernels triton; graph: --capture graph, the whole step in one CUDA graph; "
              f"KT-NAS configurations: --recompute {args.recompute or 'auto (edge)'}",
              "samples/s vs baseline and mem vs baseline: against the baseline of the same space, algorithm and "
              "batch; on the CPU peak mem is the process's RSS peak during the configuration, (+N) its increase "
              "over the RSS at its start, and mem vs baseline compares the increases",
              "streaming: step time of cached (disk) over cached (memory) - 1",
              "targets (H100): cached-fused-graph against the baseline, DARTS 1st and 2nd order at batch "
              "64: samples/s vs baseline >= 10x and mem vs baseline <= 0.125x; streaming <= +10%"]
    return Report("search", "ktnas bench search: one search step, classic DARTS vs KT-NAS", rows, COLUMNS, _chart,
                  device=rows[0]["device"] if rows else "cpu", notes=notes, chart_panels=2)

