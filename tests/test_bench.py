"""ktnas bench: both benchmarks really run, at tiny sizes, through the CLI; their outputs hold the documented
keys with positive finite numbers. No timing is asserted (the numbers depend on the machine)."""
import json
import math

import numpy as np
import pytest
import torch

from ktnas.cache.store import create_store
from ktnas.engine.cli import main

LOADER_NUMBERS = ("samples_per_s", "mb_per_s", "epoch_s", "batch_size")
LOADER_KEYS = ("source", "backend", "in_memory", "device", *LOADER_NUMBERS)
PRECOMPUTE_NUMBERS = ("image_size", "samples", "stem_images_per_s", "precompute_images_per_s", "ratio")
PRECOMPUTE_KEYS = ("stem", "device", "backend", *PRECOMPUTE_NUMBERS)
TINY = ["--dataset", "synthetic", "--weights", "none", "--samples", "256"]


def check_results(out, keys, numbers, n_rows, capsys) -> list[dict]:
    """results.json has n_rows rows with ``keys`` (``numbers`` positive and finite); results.md, results.png
    exist; the table went to stdout; no temporary store was left behind."""
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert len(rows) == n_rows
    for r in rows:
        assert set(keys) <= set(r), set(keys) - set(r)
        for k in numbers:
            assert isinstance(r[k], (int, float)) and not isinstance(r[k], bool), (k, r[k])
            assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert data["command"].startswith("ktnas bench ") and data["machine"]["cpu_count"] >= 1
    md = (out / "results.md").read_text()
    assert data["command"] in md and md.count("\n|") == n_rows + 2
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]
    assert "|---|" in capsys.readouterr().out
    return rows


def test_bench_loader_builds_a_store(tmp_path, capsys):
    out = tmp_path / "loader"
    assert main(["bench", "loader", *TINY, "--epochs", "1", "--batch-size", "64", "--out", str(out)]) == 0
    rows = check_results(out, LOADER_KEYS, LOADER_NUMBERS, 6, capsys)
    assert {(r["backend"], r["in_memory"]) for r in rows} == {(b, m) for b in ("zarr", "hdf5") for m in (False, True)}
    assert all(r["samples"] == 256 for r in rows)


def test_bench_loader_on_a_given_hdf5_store(tmp_path, capsys):
    path = tmp_path / "given.h5"
    with create_store(path, attrs={"stem": "toy", "stem_fingerprint": "f" * 64},
                      splits={"train": (300, 1, 4, 3, 3)}, dtype="float16", chunk_size=64) as st:
        sp = st.split("train")
        for c in range(sp.num_chunks):
            s, e = sp.chunk_range(c)
            sp.write_chunk(c, np.random.default_rng(c).normal(size=(e - s, 1, 4, 3, 3)), np.arange(s, e) % 10)
        st.mark_complete_if_done()
    out, threads = tmp_path / "given", torch.get_num_threads()
    assert main(["bench", "loader", "--features", str(path), "--samples", "200", "--epochs", "2",
                 "--batch-size", "32", "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    rows = check_results(out, LOADER_KEYS, LOADER_NUMBERS, 6, capsys)
    assert json.loads((out / "results.json").read_text())["machine"]["torch_threads"] == 1
    assert torch.get_num_threads() == threads  # restored after the run
    assert [r["backend"] for r in rows] == ["zarr"] * 3 + ["hdf5"] * 3
    assert all(r["samples"] == 200 for r in rows)
    assert path.exists()  # the given store is left alone


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_bench_precompute(tmp_path, capsys, backend):
    out = tmp_path / "precompute"
    assert main(["bench", "precompute", *TINY, "--batch-size", "32", "--backend", backend, "--out", str(out)]) == 0
    (row,) = check_results(out, PRECOMPUTE_KEYS, PRECOMPUTE_NUMBERS, 1, capsys)
    assert row["backend"] == backend and row["samples"] == 256 and row["stem"] == "mobilenet_v2:features.3"
    assert len(row["stem_runs"]) == len(row["precompute_runs"]) == 2
    assert row["ratio"] == pytest.approx(max(row["precompute_runs"]) / max(row["stem_runs"]))


def test_bench_needs_a_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench"])
    assert e.value.code == 2
    assert "loader" in capsys.readouterr().err
