"""``python -m ktnas.bench.compare STEP.json SEARCH.json --out compare.md``: the step profile's predictions beside
what ``ktnas bench search`` measured on a GPU (peak memory: ``max_memory_allocated``; step time: the median step),
row by row (same space, algorithm variant, batch and configuration). Used by ``bench/gpu-check.sh``; without a
GPU's measurements (no SEARCH file, or one measured on the CPU) it lists the predictions alone and says so."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _key(r):
    return r["space"], r["variant"], r["batch"], r["config"]


def compare(step_rows: list[dict], search_rows: list[dict] | None) -> list[dict]:
    """One row per profiled configuration: predicted and (where measured on CUDA) measured figures."""
    measured = {}
    for r in search_rows or []:
        if r.get("skipped") is None and str(r.get("device", "")).startswith("cuda") and r.get("source") != "memory":
            measured[_key(r)] = r
    out = []
    for p in step_rows:
        if p.get("skipped") is not None:
            continue
        m = measured.get(_key(p))
        row = dict(space=p["space"], variant=p["variant"], batch=p["batch"], config=p["config"],
                   predicted_peak_mib=p["peak_bytes"] / 2**20, predicted_ms=p["predicted_ms"],
                   launches=p["launches"], measured_peak_mib=None, measured_ms=None)
        if m is not None:
            row["measured_peak_mib"] = m["peak_mem_bytes"] / 2**20
            row["measured_ms"] = m["step_ms"]
        out.append(row)
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _diff(p, m):
    return "-" if m is None else f"{100 * (p / m - 1):+.1f}%"


def markdown(rows: list[dict], gpu: str | None) -> str:
    lines = ["# Step profile (predicted, this CPU) vs ktnas bench search (measured, " + (gpu or "no GPU") + ")", "",
             "| space | algo | batch | config | peak MiB predicted | measured | diff | step ms predicted "
             "| measured | diff | launches |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['space']} | {r['variant']} | {r['batch']} | {r['config']} | "
                     f"{_fmt(r['predicted_peak_mib'], ',.0f')} | {_fmt(r['measured_peak_mib'], ',.0f')} | "
                     f"{_diff(r['predicted_peak_mib'], r['measured_peak_mib'])} | {_fmt(r['predicted_ms'], ',.1f')} | "
                     f"{_fmt(r['measured_ms'], ',.1f')} | {_diff(r['predicted_ms'], r['measured_ms'])} | "
                     f"{r['launches']:,} |")
    if not any(r["measured_peak_mib"] is not None for r in rows):
        lines += ["", "No GPU measurement to compare with: predictions only."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", help="results.json of ktnas bench step")
    p.add_argument("search", nargs="?", help="results.json of ktnas bench search (optional)")
    p.add_argument("--out", default=None, help="write the markdown here too")
    a = p.parse_args(argv)
    try:
        step = json.loads(Path(a.step).read_text())
    except (OSError, ValueError) as e:
        print(f"ktnas compare: error: cannot read the step profile {a.step} ({e}): run ktnas bench step first",
              file=sys.stderr)
        return 2
    search, gpu = None, None
    if a.search and Path(a.search).exists():
        data = json.loads(Path(a.search).read_text())
        search = data["rows"]
        if str(data.get("machine", {}).get("device", "")).startswith("cuda"):
            gpu = data["machine"].get("device_name")
    text = markdown(compare(step["rows"], search), gpu)
    if a.out:
        Path(a.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
