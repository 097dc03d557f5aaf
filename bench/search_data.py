"""``ktnas bench search``: the host-memory meter and the data the configurations step on (cached features, images
for the stem on the fly and the classic baseline), full batches only."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ktnas.cache.datasets import load_split
from ktnas.cache.errors import KtnasError
from ktnas.cache.precompute import PrecomputeConfig, precompute
from ktnas.cache.store import open_store
from ktnas.engine.data import split_indices, standardise_images
from ktnas.engine.runs import peak_memory
from ktnas.engine.search.loop import SearchConfig

CLASSIC_SIZE = 32  # the classic DARTS search runs on 32x32 images


# ---------------------------------------------------------------------------------------------------- memory
def proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def trim_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next configuration's RSS starts low."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).malloc_trim(0)


class HostMemory:
    """Peak memory of one configuration: CUDA's allocator peak, or the process's RSS high-water mark (reset per
    configuration where Linux allows it; else the process-wide peak, which only grows)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = device.type == "cuda" or self._reset_rss()
        self.kind = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                     "peak RSS of the process during the configuration" if self.resettable else
                     "peak RSS of the process so far (its high-water mark could not be reset)")

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            return proc_status_kib("VmHWM") is not None
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            trim_host_memory()
            if self.resettable:
                self._reset_rss()
            self.base = (proc_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int:
        hwm = proc_status_kib("VmHWM") if self.device.type != "cuda" and self.resettable else None
        return hwm * 1024 if hwm is not None else peak_memory(self.device)


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class SearchData:
    """What every configuration draws from: the store, the split, and the same samples as raw images."""

    store: str
    num_classes: int
    feat_shape: tuple[int, int, int]
    train: np.ndarray                 # sample indices of search-train
    val: np.ndarray                   # and of search-validation
    attrs: dict
    images: torch.Tensor | None       # raw uint8 [n, c, h, w] (None: not loadable, see images_missing)
    classic: torch.Tensor | None      # normalised float [n, 3, 32, 32]
    labels: torch.Tensor | None
    images_missing: str | None = None


def classic_images(images: torch.Tensor, size: int = CLASSIC_SIZE) -> torch.Tensor:
    """uint8 images [n, c, h, w] -> the classic search's input: float, 3 channels, ``size`` x ``size`` (smaller
    images zero-padded around the centre, e.g. Fashion-MNIST 28 -> 32; larger ones resized, bilinear with
    antialiasing), normalised by the per-channel mean and std of these images (as ``ktnas search --stem none``)."""
    x = images.float().div_(255)
    h, w = x.shape[-2:]
    if h > size or w > size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    elif (h, w) != (size, size):
        top, left = (size - h) // 2, (size - w) // 2
        x = F.pad(x, (left, size - w - left, top, size - h - top))
    return standardise_images(x).contiguous()


def build_store(path: Path, n: int, build: dict, device) -> None:
    """Precompute the first ``n`` train samples into ``path`` (reused as it is when an earlier run made the same
    store; rebuilt when it was made with other arguments)."""
    cfg = PrecomputeConfig(out=str(path), splits=("train",), limit=n, device=str(device), progress=False,
                           resume=True, **build)
    print(f"ktnas bench search: feature store {path}: {build['dataset']} train[:{n}] through {build['stem']} "
          f"(weights {build['weights']}) at {build['image_size']} px ...", file=sys.stderr)
    try:
        precompute(cfg)
    except KtnasError as e:
        if "cannot resume" not in str(e):
            raise
        precompute(dataclasses.replace(cfg, resume=False, overwrite=True))


def load_data(features, n_wanted: int, build: dict, work_dir: Path, device, seed: int, notes: list) -> SearchData:
    if features is None:
        features = work_dir / "features.zarr"
        build_store(features, n_wanted, build, device)
        notes.append(f"features: built here into {features} (reused by a rerun with the same arguments): "
                     f"{build['dataset']} train[:{n_wanted}] through {build['stem']} (weights {build['weights']}) "
                     f"at {build['image_size']} px")
    else:
        notes.append(f"features: {features}")
    features = str(features)
    with open_store(features) as st:
        sp = st.split("train")
        attrs = dict(st.attrs)
        n = min(n_wanted, sp.shape[0])
        store_labels = torch.from_numpy(np.asarray(sp.read_labels()[:n])).long()
        feat_shape = tuple(int(v) for v in sp.shape[2:])
        num_classes = int(attrs.get("num_classes") or int(store_labels.max()) + 1)
        notes.append(f"features: {list(feat_shape)} {sp.dtype} per sample, chunks of {sp.chunk_size}, "
                     f"{attrs.get('compressor', '?')}; stem {attrs.get('stem')} at "
                     f"{attrs.get('preprocessing', {}).get('image_size')} px, weights {attrs.get('weights')}")
    train, val = split_indices(n, seed, SearchConfig().train_portion)
    images = classic = labels = None
    missing = None
    try:
        split = load_split(attrs["dataset"], "train", image_size=attrs.get("preprocessing", {}).get("image_size"),
                           seed=int(attrs.get("seed", 0)))
        if len(split) < n or not torch.equal(split.labels[:n].long(), store_labels):
            raise KtnasError(f"the images of {attrs['dataset']} here are not the ones the store was made from "
                             f"(their labels differ)")
        images, labels = split.get_batch(slice(0, n)), split.labels[:n].long().clone()
        classic = classic_images(images)
    except KtnasError as e:
        missing = f"the store's images cannot be loaded here: {e}"
    except KeyError:
        missing = "the store does not name its data set, so its images cannot be loaded"
    return SearchData(features, num_classes, feat_shape, train, val, attrs, images, classic, labels, missing)


def full_batches(loader, batch: int):
    """Endless full batches of ``loader`` (epoch after epoch; a short last batch is left out)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        got = False
        for x, y in loader:
            if len(y) == batch:
                got = True
                yield x, y
        if not got:
            raise KtnasError(f"no full batch of {batch} samples: pass --samples of at least {2 * batch}")
        epoch += 1

