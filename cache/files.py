"""A store's place on disk: existence, removal, the lock beside it, and running out of space while writing."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import threading
from pathlib import Path

from .errors import KtnasError


def store_exists(path) -> bool:
    return os.path.lexists(path)


def remove_store(path) -> None:
    """Delete a store (directory or file) and its lock file."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
    Path(_lock_path(p)).unlink(missing_ok=True)


def _lock_path(path) -> str:
    p = Path(path)
    return str(p.parent / f".{p.name}.lock")


_LOCKS: dict[str, list] = {}  # lock path -> [RLock, depth, open file holding the flock]
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def store_lock(path):
    """An exclusive lock tied to a store path (creation races, HDF5 writes): between processes through
    ``flock`` on a lock file beside the store, between threads of one process through an RLock. Re-entrant."""
    lp = _lock_path(path)
    with _LOCKS_GUARD:
        entry = _LOCKS.setdefault(lp, [threading.RLock(), 0, None])
    with entry[0]:
        if entry[1] == 0:
            Path(lp).parent.mkdir(parents=True, exist_ok=True)
            fh = open(lp, "a+")
            fcntl.flock(fh, fcntl.LOCK_EX)
            entry[2] = fh
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                fcntl.flock(entry[2], fcntl.LOCK_UN)
                entry[2].close()
                entry[2] = None


def disk_full_error(path, exc: OSError, what: str) -> KtnasError:
    """The one-line message for a write that ran out of space (or quota)."""
    return KtnasError(
        f"disk full while writing {what} to {path} ({os.strerror(exc.errno)}): free some space, then rerun "
        "the same command with --resume (chunks already written are kept)"
    )


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_as_error(path, what: str):
    """Turn an OSError of a full disk (or quota) inside the block into :func:`disk_full_error`'s one line;
    any other exception passes unchanged."""
    try:
        yield
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, e, what) from None
        raise
