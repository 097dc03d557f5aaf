"""What every run directory needs (search, train): atomic files, RNG states to resume exactly, peak memory."""
from __future__ import annotations

import json
import os
import random
import resource
import sys
from pathlib import Path

import numpy as np
import torch


def atomic_write(path, write) -> None:
    """``write(tmp_path)``, then rename over ``path``: a killed run never leaves a torn file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def atomic_save(obj, path) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_jsonl(path, rows) -> None:
    """``rows`` (dicts) as JSON lines, one per row, written atomically (metrics.jsonl, candidates.jsonl)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rng_state() -> dict:
    """Every generator a run draws from: torch (CPU and CUDA), numpy's global, python's."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=random.getstate(),  # plain types: loadable with weights_only
                numpy=(name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("numpy") is not None:
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    if state.get("python") is not None:
        random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory(device) -> int:
    """Peak bytes: ``max_memory_allocated`` on CUDA, the process's peak RSS on the CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
