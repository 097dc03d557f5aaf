"""The feature store: one API over two backends (Zarr v3, the default, and HDF5).

Layout (both backends)::

    attributes          format_version, stem spec and fingerprint, weights source, preprocessing,
                        dtype, views, data set name and fingerprint, library versions, complete
    <split>/features    [N, V, C, H, W], chunked along N
    <split>/labels      [N] int64, chunked like the features
    <split>/written     [number of chunks] bool: what a resumed precompute skips

A chunk's features and labels are written before its ``written`` flag, so a flag set means the chunk is
whole; Zarr writes every object through a temporary file and a rename, so a killed writer leaves no torn
chunk behind. Several processes may write disjoint chunks of one store at once (``--shard I/N``): Zarr
needs nothing for that (one file per chunk, one flag per chunk); HDF5 serialises writers with a lock file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from .errors import KtnasError

FORMAT_VERSION = 1
BACKENDS = ("zarr", "hdf5")
COMPRESSORS = ("zstd", "none")
_H5_SUFFIXES = (".h5", ".hdf5")


def detect_backend(path) -> str:
    """'hdf5' for a ``.h5``/``.hdf5`` path, 'zarr' otherwise (a ``.zarr`` directory)."""
    return "hdf5" if str(path).lower().endswith(_H5_SUFFIXES) else "zarr"


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


# --------------------------------------------------------------------------------------------- backends
class _ZarrBackend:
    def __init__(self, path, mode: str):
        import zarr

        self._zarr = zarr
        self.group = zarr.open_group(store=str(path), mode=mode)

    def create_array(self, name, shape, chunks, dtype, compressor, fill_value):
        from zarr.codecs import ZstdCodec

        compressors = [ZstdCodec(level=1)] if compressor == "zstd" else None
        self.group.create_array(name=name, shape=shape, chunks=chunks, dtype=dtype,
                                compressors=compressors, fill_value=fill_value)

    def array(self, name):
        return self.group[name]

    def read(self, name, sel=slice(None)):
        return np.asarray(self.group[name][sel])

    def write(self, name, sel, value):
        self.group[name][sel] = value

    def get_attrs(self) -> dict:
        return dict(self.group.attrs)

    def set_attrs(self, attrs: dict):
        self.group.attrs.update(attrs)

    def keys(self):
        return list(self.group.group_keys())

    def shape(self, name):
        return tuple(self.group[name].shape)

    def dtype(self, name):
        return np.dtype(self.group[name].dtype)

    def stored_bytes(self, name) -> int:
        return int(self.group[name].nbytes_stored())

    def close(self):
        pass


class _H5Backend:
    """HDF5 through h5py. In append mode every operation opens the file under the store lock and closes it,
    so several writer processes take turns and a killed writer leaves the file closed between chunks."""

    def __init__(self, path, mode: str):
        import h5py
        import hdf5plugin  # noqa: F401  (registers the zstd filter)

        self._h5py = h5py
        self._hdf5plugin = hdf5plugin
        self.path = str(path)
        self.mode = mode
        if mode == "w":
            with self._h5file("w"):
                pass
            self.mode = "a"
        self._file = self._h5file("r") if self.mode == "r" else None

    def _h5file(self, mode):
        # HDF5's own file locking would make a reader (`ktnas inspect`, a loader) break a running writer, and
        # one writer shard break another: writers take turns through store_lock instead
        return self._h5py.File(self.path, mode, locking=False)

    @contextlib.contextmanager
    def _open(self, write=False):
        if self._file is not None:
            yield self._file
            return
        with store_lock(self.path), self._h5file("r+" if write else "r") as f:
            yield f

    def create_array(self, name, shape, chunks, dtype, compressor, fill_value):
        kw = dict(self._hdf5plugin.Zstd(clevel=1)) if compressor == "zstd" else {}
        with self._open(write=True) as f:
            f.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fillvalue=fill_value, **kw)

    def read(self, name, sel=slice(None)):
        with self._open() as f:
            return np.asarray(f[name][sel])

    def write(self, name, sel, value):
        with self._open(write=True) as f:
            f[name][sel] = value
            f.flush()

    def get_attrs(self) -> dict:
        with self._open() as f:
            return {k: json.loads(v) for k, v in f.attrs.items()}

    def set_attrs(self, attrs: dict):
        with self._open(write=True) as f:
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v)

    def keys(self):
        with self._open() as f:
            return [k for k in f.keys() if isinstance(f[k], self._h5py.Group)]

    def shape(self, name):
        with self._open() as f:
            return tuple(f[name].shape)

    def dtype(self, name):
        with self._open() as f:
            return np.dtype(f[name].dtype)

    def stored_bytes(self, name) -> int:
        with self._open() as f:
            return int(f[name].id.get_storage_size())

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _backend(path, mode):
    return (_H5Backend if detect_backend(path) == "hdf5" else _ZarrBackend)(path, mode)


# ------------------------------------------------------------------------------------------- the store
class StoreSplit:
    """One split of a store: ``features`` [N, V, C, H, W] chunked along N, ``labels`` [N], ``written``."""

    def __init__(self, store: "FeatureStore", name: str):
        self.store = store
        self.name = name
        b = store._b
        self.shape = b.shape(f"{name}/features")
        self.dtype = b.dtype(f"{name}/features")
        self.chunk_size = int(store.attrs["chunk_size"])
        self.num_chunks = b.shape(f"{name}/written")[0]

    def __len__(self):
        return self.shape[0]

    @property
    def sample_shape(self):
        return self.shape[1:]

    @property
    def views(self):
        return self.shape[1]

    def chunk_range(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.shape[0])

    def _guard(self, what, fn):
        try:
            return fn()
        except KtnasError:
            raise
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.store.path, e, what) from None
            raise self._corrupt(what, e) from None
        except Exception as e:  # decompression, truncated files, bad metadata
            raise self._corrupt(what, e) from None

    def _corrupt(self, what, e):
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        return KtnasError(
            f"{what} of store {self.store.path} is corrupt or truncated ({type(e).__name__}: {reason}): run "
            f"`ktnas inspect {self.store.path} --verify --repair`, then finish it with precompute --resume"
        )

    def read_chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Features [n, V, C, H, W] (stored dtype) and labels [n] of chunk ``i``."""
        s = slice(*self.chunk_range(i))
        what = f"chunk {i} of split '{self.name}'"
        feats = self._guard(what, lambda: self.store._b.read(f"{self.name}/features", s))
        labels = self._guard(what, lambda: self.store._b.read(f"{self.name}/labels", s))
        return feats, labels.astype(np.int64, copy=False)

    def read_labels(self) -> np.ndarray:
        return self._guard(f"labels of split '{self.name}'",
                           lambda: self.store._b.read(f"{self.name}/labels")).astype(np.int64, copy=False)

    def written(self) -> np.ndarray:
        return self._guard(f"written record of split '{self.name}'",
                           lambda: self.store._b.read(f"{self.name}/written")).astype(bool)

    def write_chunk(self, i: int, features: np.ndarray, labels: np.ndarray) -> None:
        """Write chunk ``i`` whole, then flag it written (the flag is what resume trusts)."""
        start, stop = self.chunk_range(i)
        if features.shape != (stop - start, *self.shape[1:]):
            raise ValueError(f"chunk {i} of '{self.name}' needs features of shape "
                             f"{(stop - start, *self.shape[1:])}, got {tuple(features.shape)}")
        b, what = self.store._b, f"chunk {i} of split '{self.name}'"
        try:
            b.write(f"{self.name}/features", slice(start, stop), features.astype(self.dtype, copy=False))
            b.write(f"{self.name}/labels", slice(start, stop), labels.astype(np.int64, copy=False))
            b.write(f"{self.name}/written", slice(i, i + 1), np.ones(1, dtype=bool))
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.store.path, e, what) from None
            raise KtnasError(f"cannot write {what} to {self.store.path} ({type(e).__name__}: {e}): fix the cause, "
                             "then rerun the same command with --resume (chunks already written are kept)") from None

    def mark_unwritten(self, chunks) -> None:
        for i in chunks:
            self.store._b.write(f"{self.name}/written", slice(i, i + 1), np.zeros(1, dtype=bool))

    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def stored_bytes(self) -> int:
        return self.store._b.stored_bytes(f"{self.name}/features")


class FeatureStore:
    """An open feature store. Use :func:`create_store` or :func:`open_store` to get one."""

    def __init__(self, path, mode):
        self.path = str(path)
        self.backend = detect_backend(path)
        self.mode = mode
        self._b = _backend(path, mode)
        self.attrs = self._b.get_attrs()

    @property
    def splits(self) -> list[str]:
        return list(self.attrs.get("splits", {}))

    def split(self, name: str) -> StoreSplit:
        if name not in self.splits:
            raise KtnasError(f"store {self.path} has no split '{name}' (it has: {', '.join(self.splits)}): "
                             f"precompute it with --splits {name}")
        return StoreSplit(self, name)

    def set_attrs(self, **attrs) -> None:
        self._b.set_attrs(attrs)
        self.attrs.update(attrs)

    def written_counts(self) -> tuple[int, int]:
        done = total = 0
        for s in self.splits:
            w = self.split(s).written()
            done, total = done + int(w.sum()), total + len(w)
        return done, total

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    def mark_complete_if_done(self) -> bool:
        """Set ``complete`` when every chunk of every split is written (safe to call from any shard)."""
        done, total = self.written_counts()
        if done == total and not self.complete:
            self.set_attrs(complete=True)
        return done == total

    def size_on_disk(self) -> int:
        p = Path(self.path)
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    def close(self) -> None:
        self._b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def create_store(path, *, attrs: dict, splits: dict[str, tuple[int, ...]], dtype: str, chunk_size: int,
                 compressor: str = "zstd") -> FeatureStore:
    """Create an empty store. ``splits`` maps a split name to its features shape (N, V, C, H, W)."""
    if compressor not in COMPRESSORS:
        raise KtnasError(f"unknown compressor '{compressor}': use one of {', '.join(COMPRESSORS)}")
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(attrs)
    meta.update(format_version=FORMAT_VERSION, dtype=str(np.dtype(dtype)), chunk_size=int(chunk_size),
                compressor=compressor, backend=detect_backend(path), complete=False,
                splits={k: list(v) for k, v in splits.items()})
    try:
        b = _backend(path, "w")
        for name, shape in splits.items():
            n = shape[0]
            nchunks = max(1, -(-n // chunk_size))
            b.create_array(f"{name}/features", tuple(shape), (chunk_size, *shape[1:]), np.dtype(dtype),
                           compressor, 0)
            b.create_array(f"{name}/labels", (n,), (chunk_size,), np.int64, compressor, -1)
            b.create_array(f"{name}/written", (nchunks,), (1,), bool, "none", False)
        b.set_attrs(meta)  # last: a store without format_version was never finished being created
        b.close()
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, e, "the store's layout") from None
        raise
    return FeatureStore(path, "a")


def open_store(path, mode: str = "r", *, require_complete: bool = True,
               expect_fingerprint: str | None = None) -> FeatureStore:
    """Open a store, refusing (one line, with the fix) one that is missing, unreadable, incomplete, or built
    by another stem than ``expect_fingerprint`` names."""
    path = str(path)
    if not store_exists(path):
        raise KtnasError(f"no feature store at {path}: create it with `ktnas precompute-features --out {path}`")
    try:
        store = FeatureStore(path, "r" if mode == "r" else "a")
        version = store.attrs.get("format_version")
        for s in store.splits:
            store.split(s)
    except KtnasError:
        raise
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise KtnasError(f"{path} is not a readable ktnas feature store ({type(e).__name__}: {reason}): "
                         f"rebuild it with `ktnas precompute-features ... --out {path} --overwrite`") from None
    if version != FORMAT_VERSION:
        store.close()
        raise KtnasError(f"{path} is not a ktnas feature store of format {FORMAT_VERSION} (format_version="
                         f"{version!r}): rebuild it with `ktnas precompute-features ... --overwrite`")
    if expect_fingerprint is not None and store.attrs.get("stem_fingerprint") != expect_fingerprint:
        got = store.attrs.get("stem_fingerprint", "?")[:12]
        store.close()
        raise KtnasError(f"store {path} was built by another stem ({store.attrs.get('stem')}, fingerprint {got}) "
                         f"than the one asked for (fingerprint {expect_fingerprint[:12]}): use a store of that stem "
                         "or precompute one with it")
    if require_complete and not store.complete:
        done, total = store.written_counts()
        store.close()
        raise KtnasError(f"store {path} is incomplete ({done} of {total} chunks written): finish it by rerunning "
                         "its `ktnas precompute-features` command with --resume")
    return store


def inspect_store(path, *, verify: bool = False, repair: bool = False, progress: bool = False) -> dict:
    """Metadata, shapes, completeness, size on disk and compression ratio of a store. With ``verify``, read
    every written chunk and check that it decodes, its features are finite and its labels lie in
    ``[0, num_classes)``; with ``repair`` as well, flag the bad chunks unwritten so that
    ``precompute --resume`` writes them again."""
    store = open_store(path, "a" if repair else "r", require_complete=False)
    try:
        attrs = store.attrs
        report = dict(path=store.path, backend=store.backend, attrs=attrs, complete=store.complete,
                      size_on_disk=store.size_on_disk(), splits={})
        ncls = attrs.get("num_classes")
        for name in store.splits:
            sp = store.split(name)
            w = sp.written()
            stored = sp.stored_bytes()
            per_sample = sp.nbytes() // max(1, sp.shape[0])
            written_bytes = sum(per_sample * (b - a) for a, b in map(sp.chunk_range, np.flatnonzero(w)))
            info = dict(shape=list(sp.shape), dtype=str(sp.dtype), chunk_size=sp.chunk_size,
                        chunks=sp.num_chunks, chunks_written=int(w.sum()), nbytes=sp.nbytes(),
                        stored_bytes=stored, compression_ratio=written_bytes / stored if written_bytes else None)
            if verify:
                bad = {}
                chunks = range(sp.num_chunks)
                if progress:
                    from tqdm.auto import tqdm

                    chunks = tqdm(chunks, desc=f"verify {name}", unit="chunk")
                for i in chunks:
                    if not w[i]:
                        continue
                    try:
                        f, y = sp.read_chunk(i)
                    except KtnasError as e:
                        bad[i] = str(e).split(" (")[1].split(")")[0] if " (" in str(e) else "unreadable"
                        continue
                    if not np.isfinite(f).all():
                        bad[i] = "NaN/Inf features"
                    elif ncls is not None and ((y < 0) | (y >= ncls)).any():
                        bad[i] = f"labels outside 0..{ncls - 1}"
                info["bad_chunks"] = {int(k): v for k, v in bad.items()}
                if repair and bad:
                    sp.mark_unwritten(bad)
            report["splits"][name] = info
        if verify:
            report["verified_ok"] = all(not s["bad_chunks"] for s in report["splits"].values())
            if repair and not report["verified_ok"]:
                store.set_attrs(complete=False)
                report["complete"] = False
        return report
    finally:
        store.close()
