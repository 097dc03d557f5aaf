"""The feature store's two backends behind one small interface (arrays by name, JSON attributes): Zarr v3,
the default, and HDF5. :mod:`ktnas.cache.store` builds the store's API on top of :func:`open_backend`."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from .files import store_lock

BACKENDS = ("zarr", "hdf5")
_H5_SUFFIXES = (".h5", ".hdf5")
# compressors each backend writes. zstd is level 1 in both; HDF5's gzip is deflate level 1 after the byte
# shuffle filter, lzf is h5py's own filter (both built into every HDF5 / h5py); zstd in HDF5 is the filter
# 32015 registered by hdf5plugin, which plain h5py and other HDF5 tools do not have
BACKEND_COMPRESSORS = {"zarr": ("zstd", "gzip", "none"), "hdf5": ("zstd", "gzip", "lzf", "none")}


def detect_backend(path) -> str:
    """'hdf5' for a ``.h5``/``.hdf5`` path, 'zarr' otherwise (a ``.zarr`` directory)."""
    return "hdf5" if str(path).lower().endswith(_H5_SUFFIXES) else "zarr"


def open_backend(path, mode: str):
    """The backend :func:`detect_backend` names for ``path``, opened in ``mode`` ('r', 'a' or 'w')."""
    return (_H5Backend if detect_backend(path) == "hdf5" else _ZarrBackend)(path, mode)


class _ZarrBackend:
    def __init__(self, path, mode: str):
        import zarr

        self._zarr = zarr
        self.path = str(path)
        self.group = zarr.open_group(store=str(path), mode=mode)

    def create_array(self, name, shape, chunks, dtype, compressor, fill_value):
        from zarr.codecs import GzipCodec, ZstdCodec

        compressors = {"zstd": [ZstdCodec(level=1)], "gzip": [GzipCodec(level=1)]}.get(compressor)
        self.group.create_array(name=name, shape=shape, chunks=chunks, dtype=dtype, compressors=compressors,
                                fill_value=fill_value)

    def array(self, name):
        return self.group[name]

    def read(self, name, sel=slice(None)):
        return np.asarray(self.group[name][sel])

    def write(self, name, sel, value):
        # write_empty_chunks (a runtime setting, not stored): a chunk equal to the fill value is still written
        # as a file, so a missing file always means lost data
        a = self.group[name]
        if hasattr(a, "with_config"):  # zarr >= 3.1
            a.with_config({"write_empty_chunks": True})[sel] = value
        else:
            with self._zarr.config.set({"array.write_empty_chunks": True}):
                a[sel] = value

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

    def chunk_stored(self, name, i: int) -> bool:
        """Whether chunk ``i`` (along the first axis) of array ``name`` has its file (Zarr reads a missing
        one as fill values)."""
        a = self.group[name]
        return (Path(self.path) / name / a.metadata.encode_chunk_key((i,) + (0,) * (a.ndim - 1))).is_file()

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
        kw = {"zstd": lambda: dict(self._hdf5plugin.Zstd(clevel=1)),
              "gzip": lambda: dict(compression="gzip", compression_opts=1, shuffle=True),
              "lzf": lambda: dict(compression="lzf")}.get(compressor, dict)()
        # HDF5 refuses a chunk larger than its array (a split smaller than one chunk): one chunk holds it all
        chunks = tuple(max(1, min(c, n)) for c, n in zip(chunks, shape))
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

    def chunk_stored(self, name, i: int) -> bool:
        """HDF5 keeps every chunk in the one file, written under the lock before its flag: always True."""
        return True

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
