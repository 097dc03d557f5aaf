"""Compressors and portability: every backend/compressor round-trips; the default HDF5 store opens in plain h5py
(no hdf5plugin) and a zstd one says it needs the plugin, in its attributes and in `ktnas inspect`."""
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from conftest import TINY
from ktnas.bench.store import plain_reader_opens
from ktnas.cache.errors import KtnasError
from ktnas.cache.precompute import precompute
from ktnas.cache.store import DEFAULT_COMPRESSOR, create_store, inspect_store, open_store
from ktnas.engine.cli import main

SHAPE = (23, 1, 3, 4, 4)
CASES = [("s.zarr", "zstd"), ("s.zarr", "gzip"), ("s.zarr", "none"),
         ("s.h5", "zstd"), ("s.h5", "gzip"), ("s.h5", "lzf"), ("s.h5", "none")]


def _make(path, compressor=None, chunk_size=5):
    """A complete store of smooth (compressible) float16 features; returns them."""
    feats = np.repeat(np.linspace(-2, 2, SHAPE[0] * 16, dtype=np.float16).reshape(SHAPE[0], 1, 1, 4, 4), 3, axis=2)
    with create_store(path, attrs=dict(stem="toy", stem_fingerprint="f" * 64, num_classes=10),
                      splits={"train": SHAPE}, dtype="float16", chunk_size=chunk_size, compressor=compressor) as s:
        sp = s.split("train")
        for i in range(sp.num_chunks):
            a, b = sp.chunk_range(i)
            sp.write_chunk(i, feats[a:b], np.arange(a, b) % 10)
        s.mark_complete_if_done()
    return feats


@pytest.mark.parametrize("name, compressor", CASES)
def test_every_backend_and_compressor_round_trips(tmp_path, name, compressor):
    path = tmp_path / name
    feats = _make(path, compressor)
    with open_store(path) as s:
        assert s.attrs["compressor"] == compressor
        sp = s.split("train")
        np.testing.assert_array_equal(np.concatenate([sp.read_chunk(i)[0] for i in range(sp.num_chunks)]), feats)
    rep = inspect_store(path, verify=True)
    assert rep["verified_ok"]
    ratio = rep["splits"]["train"]["compression_ratio"]
    assert (ratio < 1.0) if compressor == "none" else (ratio > 1.0), ratio  # a filter that compresses nothing fails


@pytest.mark.parametrize("name", ["small.h5", "small.zarr"])
def test_a_split_smaller_than_one_chunk(tmp_path, name):
    """A split of 23 samples in chunks of 64 (a small image folder's test split): one chunk holds it all."""
    feats = _make(tmp_path / name, chunk_size=64)
    with open_store(tmp_path / name) as s:
        sp = s.split("train")
        assert sp.num_chunks == 1
        np.testing.assert_array_equal(sp.read_chunk(0)[0], feats)
    assert inspect_store(tmp_path / name, verify=True)["verified_ok"]


def test_defaults_by_backend(tmp_path):
    assert DEFAULT_COMPRESSOR == {"zarr": "zstd", "hdf5": "gzip"}
    for name, expected in (("d.zarr", "zstd"), ("d.h5", "gzip")):
        _make(tmp_path / name)
        with open_store(tmp_path / name) as s:
            assert s.attrs["compressor"] == expected and "requires_plugin" not in s.attrs


def test_a_compressor_the_backend_cannot_write_is_refused_in_one_line(tmp_path):
    with pytest.raises(KtnasError, match=r"compressor 'lzf' is not available for a zarr store .*zstd, gzip, none or "
                                         r"a \.h5 path") as e:
        _make(tmp_path / "x.zarr", "lzf")
    assert "\n" not in str(e.value) and not (tmp_path / "x.zarr").exists()
    with pytest.raises(KtnasError, match="unknown compressor 'brotli'"):
        _make(tmp_path / "x.h5", "brotli")


def test_default_hdf5_store_opens_in_plain_h5py_and_a_zstd_one_says_it_needs_the_plugin(tmp_path, capsys):
    """A fresh Python importing only h5py: the default store decodes there, a zstd store fails there, and the
    zstd store's attributes and `ktnas inspect` tell how to open it (import hdf5plugin)."""
    _make(tmp_path / "portable.h5")
    _make(tmp_path / "zstd.h5", "zstd")
    assert plain_reader_opens(tmp_path / "portable.h5", "hdf5")
    assert not plain_reader_opens(tmp_path / "zstd.h5", "hdf5")
    code = "import sys, hdf5plugin, h5py\nh5py.File(sys.argv[1], 'r')['train/features'][:]"
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "zstd.h5")]).returncode == 0  # the hint works
    with open_store(tmp_path / "zstd.h5") as s:
        assert "import hdf5plugin" in s.attrs["requires_plugin"]
    plain = subprocess.run([sys.executable, "-c", "import sys, h5py, json\nf = h5py.File(sys.argv[1], 'r')\n"
                            "print(json.loads(f.attrs['requires_plugin']))", str(tmp_path / "zstd.h5")],
                           capture_output=True, text=True)
    assert "hdf5plugin" in plain.stdout  # readable where the data are not: the attribute tells the fix
    assert main(["inspect", str(tmp_path / "zstd.h5")]) == 0
    out = capsys.readouterr().out
    assert "read with  import hdf5plugin, h5py; h5py.File(" in out and "HDF5_PLUGIN_PATH" in out
    assert main(["inspect", str(tmp_path / "portable.h5"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["requires_plugin"] is None and "no plugin needed" in r["read_without_ktnas"]


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian hdf5-tools, installed by make setup)")
def test_default_hdf5_store_decodes_in_h5dump(tmp_path):
    """HDF5's own command-line tool (C library, no Python, no plugin) prints the default store's values; for a
    zstd store it prints none (it cannot decode the filter), which is why zstd is not HDF5's default."""
    feats = _make(tmp_path / "portable.h5")
    _make(tmp_path / "zstd.h5", "zstd")

    def dump(name):
        r = subprocess.run(["h5dump", "-d", "/train/features", "-c", "1,1,1,1,2", str(tmp_path / name)],
                           capture_output=True, text=True)
        return r.stdout.split("DATA {", 1)[1].split("}", 1)[0]

    assert f"{float(feats[0, 0, 0, 0, 0]):g}" in dump("portable.h5") and ":" in dump("portable.h5")
    assert ":" not in dump("zstd.h5")  # no values decoded


def _pre(out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return precompute(**dict(TINY, out=str(out), **kw))


def test_resume_keeps_the_compressor_a_store_was_made_with(tmp_path):
    """An HDF5 store made with zstd (the default before gzip) resumes without --compressor and stays zstd;
    asking for another compressor on resume is refused in one line, naming both."""
    out = tmp_path / "old.h5"
    _pre(out, compressor="zstd", limit=20, chunk_size=5)
    s = _pre(out, resume=True, limit=20, chunk_size=5)
    assert s["chunks_written"] == 0 and s["complete"]
    with pytest.raises(KtnasError, match=r"another compressor \('zstd' there, 'gzip' now\)"):
        _pre(out, resume=True, limit=20, chunk_size=5, compressor="gzip")
    with open_store(out) as st:
        assert st.attrs["compressor"] == "zstd" and "requires_plugin" in st.attrs


def test_bench_store_measures_every_case_on_identical_data(tmp_path, capsys):
    """Quick mode of `ktnas bench store` on a given store: one row per backend and compressor, the sizes
    ordered as the filters promise, and the plain-reader check true except for HDF5 zstd."""
    src = tmp_path / "given.zarr"
    _make(src)
    out = tmp_path / "bench"
    assert main(["bench", "store", "--features", str(src), "--epochs", "1", "--batch-size", "8",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["backend"], r["compressor"]) for r in rows] == [(n.split(".")[1].replace("h5", "hdf5"), c)
                                                                for n, c in CASES]
    for r in rows:
        assert r["raw_bytes"] == np.prod(SHAPE) * 2 and r["write_mb_per_s"] > 0 and r["read_mb_per_s"] > 0
        assert r["loader_samples_per_s"] > 0
        assert r["plain_reader"] == ((r["backend"], r["compressor"]) != ("hdf5", "zstd"))
        assert (r["ratio"] > 1) == (r["compressor"] != "none")
    assert [r["default"] for r in rows] == [c == DEFAULT_COMPRESSOR[r["backend"]] for r, (_, c) in zip(rows, CASES)]
    assert "| hdf5 | gzip (default) |" in capsys.readouterr().out
    assert main(["bench", "store", "--features", str(src), "--backends", "zarr", "--compressors", "lzf"]) == 2
    assert "zarr stores cannot use compressor 'lzf'" in capsys.readouterr().err
