"""What every ktnas command shares at run time: the device it runs on and the default store's path."""
from __future__ import annotations

import functools
import os
import sys

import torch

from .errors import KtnasError

LOG_INTERVAL_S = 30.0  # seconds between progress lines when standard error is not a terminal

DEFAULT_OUT = "runs/fashion-mnist_mobilenet_v2-features.3_64.zarr"  # the embedded default's store


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; a one-line KtnasError for CUDA asked without one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KtnasError(f"--device {device} asked for, but no CUDA device is available: use --device cpu or auto")
    return torch.device(device)


def progress(iterable=None, *, desc: str, enabled: bool = True, file=None, **kw):
    """The one progress bar of every long loop of ktnas (tqdm on standard error). On a terminal it redraws as tqdm
    does; written to a log (CI, a cluster job, ``make demo > log``) it prints a line at most every
    :data:`LOG_INTERVAL_S` seconds (``KTNAS_PROGRESS_INTERVAL`` overrides) and when it ends, never one per step:
    a new postfix or description (the running loss, say) shows in the next of those lines instead of forcing one."""
    from tqdm.auto import tqdm

    file = file or sys.stderr
    tty = bool(getattr(file, "isatty", lambda: False)())
    if tty:
        return tqdm(iterable, desc=desc, disable=not enabled, file=file, dynamic_ncols=True, **kw)
    every = float(os.environ.get("KTNAS_PROGRESS_INTERVAL", LOG_INTERVAL_S))
    kw = dict(dict(mininterval=every, maxinterval=every, ncols=100), **kw)  # maxinterval: tqdm's monitor
    return _log_bar(tqdm)(iterable, desc=desc, disable=not enabled, file=file, dynamic_ncols=False, **kw)


@functools.lru_cache(maxsize=None)
def _log_bar(tqdm):
    """``tqdm`` whose postfix and description changes wait for its next timed line (tqdm redraws at each by
    default: in a log, a line per update)."""
    class LogBar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            super().set_postfix(ordered_dict, refresh=False, **kwargs)

        def set_postfix_str(self, s="", refresh=True):
            super().set_postfix_str(s, refresh=False)

        def set_description(self, desc=None, refresh=True):
            super().set_description(desc, refresh=False)
    return LogBar
