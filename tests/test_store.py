"""The feature store: both backends round-trip, and every broken store is refused with a one-line fix."""
import errno
import json

import numpy as np
import pytest

from ktnas.cache.errors import KtnasError
from ktnas.cache.store import create_store, inspect_store, open_store

BACKENDS = ["s.zarr", "s.h5"]
SHAPE = (23, 2, 3, 4, 4)  # N, V, C, H, W; chunks of 5 -> 5 chunks, the last short


def _make(path, complete=True, dtype="float16", compressor="zstd"):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal(SHAPE).astype(dtype)
    labels = rng.integers(0, 10, SHAPE[0])
    store = create_store(path, attrs=dict(stem="resnet18:layer1", stem_fingerprint="f" * 64, num_classes=10),
                         splits={"train": SHAPE, "test": (7, *SHAPE[1:])}, dtype=dtype, chunk_size=5,
                         compressor=compressor)
    for name in store.splits:
        sp = store.split(name)
        n = sp.shape[0]
        for i in range(sp.num_chunks if complete else 2):
            a, b = sp.chunk_range(i)
            sp.write_chunk(i, feats[a:b] if n == SHAPE[0] else feats[a:b] * 2, labels[a:b])
    store.mark_complete_if_done()
    store.close()
    return feats, labels


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype, compressor", [("float16", "zstd"), ("float32", "none")])
def test_round_trip(tmp_path, name, dtype, compressor):
    path = tmp_path / name
    feats, labels = _make(path, dtype=dtype, compressor=compressor)
    with open_store(path, expect_fingerprint="f" * 64) as s:
        assert s.complete and s.splits == ["train", "test"] and s.backend == ("hdf5" if name.endswith("h5") else "zarr")
        sp = s.split("train")
        assert sp.shape == SHAPE and sp.num_chunks == 5 and sp.chunk_range(4) == (20, 23)
        assert sp.dtype == np.dtype(dtype) and sp.written().all()
        got = np.concatenate([sp.read_chunk(i)[0] for i in range(sp.num_chunks)])
        np.testing.assert_array_equal(got, feats)
        np.testing.assert_array_equal(sp.read_labels(), labels)
        assert s.attrs["stem"] == "resnet18:layer1" and s.attrs["compressor"] == compressor
        assert s.size_on_disk() > 0
    rep = inspect_store(path, verify=True)
    assert rep["verified_ok"] and rep["splits"]["train"]["chunks_written"] == 5
    if compressor == "none":
        assert 0.75 < rep["splits"]["train"]["compression_ratio"] <= 1.0  # padding of the last chunk, metadata


@pytest.mark.parametrize("name", BACKENDS)
def test_complete_only_when_every_chunk_is_written(tmp_path, name):
    _make(tmp_path / name, complete=False)
    with pytest.raises(KtnasError, match=r"incomplete \(4 of 7 chunks written\).*--resume") as e:
        open_store(tmp_path / name)
    assert "\n" not in str(e.value)
    with open_store(tmp_path / name, require_complete=False) as s:
        assert not s.complete and list(s.split("train").written()) == [True, True, False, False, False]


@pytest.mark.parametrize("name", BACKENDS)
def test_store_of_another_stem_is_refused(tmp_path, name):
    _make(tmp_path / name)
    with pytest.raises(KtnasError, match=r"built by another stem \(resnet18:layer1"):
        open_store(tmp_path / name, expect_fingerprint="0" * 64)


def test_missing_unreadable_and_foreign_stores_are_refused(tmp_path):
    with pytest.raises(KtnasError, match="no feature store at .*precompute-features --out"):
        open_store(tmp_path / "nothing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(KtnasError, match="not a readable ktnas feature store"):
        open_store(tmp_path / "empty.zarr")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(KtnasError, match="not a readable ktnas feature store"):
        open_store(tmp_path / "text.h5")
    _make(tmp_path / "old.zarr")
    meta = tmp_path / "old.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format_version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(KtnasError, match="format_version=99"):
        open_store(tmp_path / "old.zarr")
    meta.write_text(meta.read_text()[:40])  # a torn metadata file
    with pytest.raises(KtnasError, match="not a readable ktnas feature store") as e:
        open_store(tmp_path / "old.zarr")
    assert "\n" not in str(e.value)


def test_truncated_hdf5_file_is_refused(tmp_path):
    _make(tmp_path / "s.h5")
    data = (tmp_path / "s.h5").read_bytes()
    (tmp_path / "s.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(KtnasError, match="not a readable ktnas feature store|corrupt or truncated"):
        with open_store(tmp_path / "s.h5") as s:
            for i in range(s.split("train").num_chunks):
                s.split("train").read_chunk(i)


def test_corrupt_chunk_is_found_by_verify_and_repair_makes_it_resumable(tmp_path):
    path = tmp_path / "s.zarr"
    _make(path)
    chunk = path / "train" / "features" / "c" / "2" / "0" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.write_bytes(chunk.read_bytes()[:10])  # truncated
    with open_store(path) as s:
        with pytest.raises(KtnasError, match="chunk 2 of split 'train'.*corrupt or truncated.*--repair") as e:
            s.split("train").read_chunk(2)
        assert "\n" not in str(e.value)
    rep = inspect_store(path, verify=True)
    assert not rep["verified_ok"] and list(rep["splits"]["train"]["bad_chunks"]) == [2]
    rep = inspect_store(path, verify=True, repair=True)
    with open_store(path, require_complete=False) as s:
        assert not s.complete
        assert list(s.split("train").written()) == [True, True, False, True, True]


def test_nan_features_and_bad_labels_fail_verify(tmp_path):
    path = tmp_path / "s.zarr"
    _make(path)
    with open_store(path, "a") as s:
        sp = s.split("test")
        f, y = sp.read_chunk(1)
        f[0, 0, 0, 0, 0] = np.nan
        sp.write_chunk(1, f, y)
        f, y = sp.read_chunk(0)
        y[3] = 12
        sp.write_chunk(0, f, y)
    rep = inspect_store(path, verify=True)
    assert rep["splits"]["test"]["bad_chunks"] == {0: "has labels outside 0..9", 1: "holds NaN/Inf features"}


@pytest.mark.parametrize("name", BACKENDS)
def test_disk_full_is_one_line_and_keeps_written_chunks(tmp_path, name, monkeypatch):
    path = tmp_path / name
    _make(path, complete=False)
    with open_store(path, "a", require_complete=False) as s:
        sp = s.split("train")
        backend = type(s._b)
        real = backend.write

        def full(self, arr, sel, value):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(backend, "write", full)
        with pytest.raises(KtnasError, match=r"disk full while writing chunk 2 .*free some space.*--resume") as e:
            sp.write_chunk(2, np.zeros((5, *SHAPE[1:]), np.float16), np.zeros(5, np.int64))
        assert "\n" not in str(e.value)
        monkeypatch.setattr(backend, "write", real)
    with open_store(path, require_complete=False) as s:
        assert list(s.split("train").written()) == [True, True, False, False, False]
