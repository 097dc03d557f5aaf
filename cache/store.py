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

The backends are in :mod:`ktnas.cache.backends`, the store's place on disk (lock, removal, disk-full errors) in
:mod:`ktnas.cache.files`; their public names are importable from here as well.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .backends import BACKEND_COMPRESSORS, BACKENDS, detect_backend, open_backend
from .errors import KtnasError, first_line
from .files import disk_full_as_error, disk_full_error, is_disk_full, remove_store, store_exists, store_lock

__all__ = ["BACKENDS", "COMPRESSORS", "DEFAULT_COMPRESSOR", "FORMAT_VERSION", "FeatureStore", "StoreSplit",
           "create_store", "detect_backend",
           "disk_full_error", "inspect_store", "is_disk_full", "open_store", "opening_hint", "remove_store",
           "resolve_compressor", "store_exists", "store_lock"]

FORMAT_VERSION = 1
COMPRESSORS = ("zstd", "gzip", "lzf", "none")
# by measurement (docs/guides/stores.md, "Compressors"): zstd for Zarr; for HDF5 deflate + shuffle, as small as zstd on
# stem features and readable by every HDF5 build, where zstd needs the hdf5plugin filter
DEFAULT_COMPRESSOR = {"zarr": "zstd", "hdf5": "gzip"}
PLUGIN_NOTE = ("zstd filter 32015 from hdf5plugin: in Python `import hdf5plugin` before h5py.File; h5dump, HDFView "
               "or MATLAB need HDF5_PLUGIN_PATH set to hdf5plugin.PLUGIN_PATH")


def resolve_compressor(path, compressor: str | None = None) -> str:
    """``compressor``, or the default of the store's backend when None; refused (one line) when the backend
    of ``path`` cannot write it."""
    backend = detect_backend(path)
    compressor = DEFAULT_COMPRESSOR[backend] if compressor is None else compressor
    if compressor not in BACKEND_COMPRESSORS[backend]:
        raise KtnasError(f"compressor '{compressor}' is not available for a {backend} store ({path}): use one of "
                         f"{', '.join(BACKEND_COMPRESSORS[backend])}"
                         + (" or a .h5 path" if compressor in COMPRESSORS else ""))
    return compressor


def opening_hint(path, backend: str, compressor: str | None, split: str = "train") -> str:
    """How to read store ``path``'s features without ktnas (one line)."""
    if backend == "zarr":
        return f'zarr.open_group("{path}", mode="r")["{split}/features"] (zarr-python >= 3, any Zarr v3 reader)'
    if compressor == "zstd":
        return (f'import hdf5plugin, h5py; h5py.File("{path}", "r")["{split}/features"] (the {PLUGIN_NOTE}; '
                "attributes are JSON text)")
    return (f'h5py.File("{path}", "r")["{split}/features"], or h5dump, HDFView, MATLAB: no plugin needed '
            "(attributes are JSON text)")


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
            with disk_full_as_error(self.store.path, what):
                return fn()
        except KtnasError:
            raise
        except Exception as e:  # decompression, truncated files, bad metadata, any other OSError
            raise self._corrupt(what, e) from None

    def _corrupt(self, what, e):
        reason = first_line(e, 160)
        return KtnasError(
            f"{what} of store {self.store.path} is corrupt or truncated ({type(e).__name__}: {reason}): run "
            f"`ktnas inspect {self.store.path} --verify --repair`, then finish it with precompute --resume"
        )

    def read_chunk(self, i: int, check: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Features [n, V, C, H, W] (stored dtype) and labels [n] of chunk ``i``. With ``check`` (what the
        loaders ask for), a chunk that reads but is not what precompute wrote is refused in one line: its file
        is missing (a store reads those as fill values), its features are NaN/Inf, its labels are out of range."""
        s = slice(*self.chunk_range(i))
        what = f"chunk {i} of split '{self.name}'"
        feats = self._guard(what, lambda: self.store._b.read(f"{self.name}/features", s))
        labels = self._guard(what, lambda: self.store._b.read(f"{self.name}/labels", s)).astype(np.int64, copy=False)
        problem = self.chunk_problem(i, feats, labels) if check else None
        if problem:
            raise KtnasError(f"{what} of store {self.store.path} {problem}: run `ktnas inspect {self.store.path} "
                             "--verify --repair`, then finish it with precompute --resume")
        return feats, labels

    def chunk_problem(self, i: int, feats: np.ndarray, labels: np.ndarray) -> str | None:
        """Why chunk ``i`` (already read: ``feats``, ``labels``) is not what precompute wrote, or None."""
        b = self.store._b
        if not (b.chunk_stored(f"{self.name}/features", i) and b.chunk_stored(f"{self.name}/labels", i)) \
                or (labels < 0).any():
            return "is flagged written but its data are missing (a chunk file was deleted?)"
        if not np.isfinite(feats).all():
            return "holds NaN/Inf features"
        ncls = self.store.attrs.get("num_classes")
        if ncls is not None and (labels >= ncls).any():
            return f"has labels outside 0..{ncls - 1}"
        return None

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
            with disk_full_as_error(self.store.path, what):
                b.write(f"{self.name}/features", slice(start, stop), features.astype(self.dtype, copy=False))
                b.write(f"{self.name}/labels", slice(start, stop), labels.astype(np.int64, copy=False))
                b.write(f"{self.name}/written", slice(i, i + 1), np.ones(1, dtype=bool))
        except OSError as e:
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
        self._b = open_backend(path, mode)
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
                 compressor: str | None = None) -> FeatureStore:
    """Create an empty store. ``splits`` maps a split name to its features shape (N, V, C, H, W); ``compressor``
    None takes the backend's default (:data:`DEFAULT_COMPRESSOR`). A store that needs a filter plugin says so
    in its ``requires_plugin`` attribute."""
    if compressor is not None and compressor not in COMPRESSORS:
        raise KtnasError(f"unknown compressor '{compressor}': use one of {', '.join(COMPRESSORS)}")
    compressor = resolve_compressor(path, compressor)
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(attrs)
    meta.pop("requires_plugin", None)
    meta.update(format_version=FORMAT_VERSION, dtype=str(np.dtype(dtype)), chunk_size=int(chunk_size),
                compressor=compressor, backend=detect_backend(path), complete=False,
                splits={k: list(v) for k, v in splits.items()})
    if meta["backend"] == "hdf5" and compressor == "zstd":
        meta["requires_plugin"] = PLUGIN_NOTE
    with disk_full_as_error(path, "the store's layout"):
        b = open_backend(path, "w")
        for name, shape in splits.items():
            n = shape[0]
            nchunks = max(1, -(-n // chunk_size))
            b.create_array(f"{name}/features", tuple(shape), (chunk_size, *shape[1:]), np.dtype(dtype),
                           compressor, 0)
            b.create_array(f"{name}/labels", (n,), (chunk_size,), np.int64, compressor, -1)
            b.create_array(f"{name}/written", (nchunks,), (1,), bool, "none", False)
        b.set_attrs(meta)  # last: a store without format_version was never finished being created
        b.close()
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
        reason = first_line(e, 160)
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
                      size_on_disk=store.size_on_disk(), splits={},
                      requires_plugin=attrs.get("requires_plugin"),
                      read_without_ktnas=opening_hint(store.path, store.backend, attrs.get("compressor"),
                                                      (store.splits or ["train"])[0]))
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
                bad = _bad_chunks(sp, w, progress)
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


def _bad_chunks(sp: StoreSplit, written: np.ndarray, progress: bool) -> dict:
    """Read every written chunk of ``sp``: {chunk: why it is bad} for those that do not decode or that
    :meth:`StoreSplit.chunk_problem` refuses (missing data, NaN/Inf features, labels out of range)."""
    bad = {}
    chunks = range(sp.num_chunks)
    if progress:
        from .runtime import progress as bar

        chunks = bar(chunks, desc=f"verify {sp.name}", unit="chunk")
    for i in chunks:
        if not written[i]:
            continue
        try:
            f, y = sp.read_chunk(i)
        except KtnasError as e:
            bad[i] = str(e).split(" (")[1].split(")")[0] if " (" in str(e) else "unreadable"
            continue
        problem = sp.chunk_problem(i, f, y)
        if problem:
            bad[i] = problem
    return bad
