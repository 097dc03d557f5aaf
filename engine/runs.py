"""The run layer: a run directory (config, metrics, checkpoints with one resume rule, atomic files), RNG states to
resume exactly, progress bars, peak memory. Search, train and evolve all use it."""
from __future__ import annotations

import json
import os
import random
import resource
import sys
from pathlib import Path

import numpy as np
import torch

from ktnas.cache.errors import KtnasError, first_line
from ktnas.cache.runtime import progress  # noqa: F401 - the bars of search, train and evolve


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




class RunDir:
    """A run directory: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` and the run's other files, all
    written atomically, with one resume rule.

    ``kind`` names the run in messages ("search", "training run", "evolve run"). ``main`` False (a DDP rank other
    than 0): nothing is written. ``ignore``: configuration fields a resumed run may change (paths, progress,
    devices, stop points)."""

    CHECKPOINT = "checkpoint.pt"

    def __init__(self, out, kind: str, *, resume: bool = False, main: bool = True, ignore=()):
        self.path, self.kind, self.resume, self.main = Path(out), kind, resume, main
        self.ignore = set(ignore) | {"out", "resume", "progress"}

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.CHECKPOINT

    def file(self, name: str) -> Path:
        return self.path / name

    # --------------------------------------------------------------------------------------------- resume
    def read_checkpoint(self) -> dict | None:
        """The checkpoint to resume from (None for a fresh run); a KtnasError when one is there but ``resume`` is
        off, or when it cannot be read (loaded with ``weights_only=True``: plain data and tensors only)."""
        ckpt = self.checkpoint_path
        if not ckpt.exists():
            return None
        if not self.resume:
            raise KtnasError(f"{self.path} already holds a {self.kind} ({self.CHECKPOINT}): pass --resume to continue "
                             f"it, or another --out")
        try:
            return torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise KtnasError(f"cannot resume from {ckpt} ({type(e).__name__}: {first_line(e)}): rerun with the run's "
                             f"original arguments, or start afresh in another --out") from None

    def check_config(self, old: dict, new: dict) -> None:
        """The one resume rule: every field of the run's configuration but ``ignore`` must be as it was."""
        for k, v in new.items():
            if k not in self.ignore and k in old and old[k] != v:
                flag = "--" + k.replace("_", "-")
                raise KtnasError(f"{self.path} was run with {flag} {old[k]}, not {v}: resume with the same {flag} "
                                 f"(the run's own arguments), or start afresh in another --out")

    # ---------------------------------------------------------------------------------------------- files
    def _ready(self) -> bool:
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
        return self.main

    def save_checkpoint(self, state: dict, config: dict) -> None:
        """``state`` plus the configuration and every RNG state, atomically."""
        if self._ready():
            atomic_save(dict(state, config=config, rng=rng_state()), self.checkpoint_path)

    def write_json(self, name: str, obj) -> None:
        if self._ready():
            atomic_write_text(self.file(name), json.dumps(obj, indent=1) + "\n")

    def write_jsonl(self, name: str, rows) -> None:
        if self._ready():
            atomic_write_jsonl(self.file(name), rows)

    def write(self, name: str, write) -> None:
        """``write(tmp_path)`` for any other file (arrays, genotypes, pictures), atomically."""
        if self._ready():
            atomic_write(self.file(name), write)

    def save_npz(self, name: str, arrays: dict) -> None:
        def save(p):
            with open(p, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
                np.savez(f, **arrays)
        self.write(name, save)


def seed_all(seed: int) -> None:
    """Seed torch's, numpy's global and python's generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
