"""What every ktnas command shares at run time: the device it runs on and the default store's path."""
from __future__ import annotations

import torch

from .errors import KtnasError

DEFAULT_OUT = "runs/fashion-mnist_mobilenet_v2-features.3_64.zarr"  # the embedded default's store


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; a one-line KtnasError for CUDA asked without one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KtnasError(f"--device {device} asked for, but no CUDA device is available: use --device cpu or auto")
    return torch.device(device)
