"""ktnas bench evolve --quick: every algorithm over two seeds at one budget, their best accuracies and the
predictors' held-out tau reported, and a rerun reusing the runs."""
import json
import warnings

import numpy as np
import pytest

from conftest import TINY
from ktnas.cache.precompute import precompute
from ktnas.engine.cli import main


def test_quick_evolve_comparison(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64 images: every candidate trains one batch, validates one
        precompute(**dict(TINY, out=str(store), splits=("train",), limit=64))
    argv = ["bench", "evolve", "--quick", "--features", str(store), "--device", "cpu", "--out", str(tmp_path / "b"),
            "--algos", "random,rea,predictor-gae,predictor-dcl,rea+params"]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert [r["algo"] for r in rows] == ["random", "rea", "predictor-gae", "predictor-dcl", "rea+params"]
    for s in (0, 1):  # screened: the initial population is the pool's 6 largest networks, then evolution
        r = json.loads((tmp_path / "b" / "runs" / f"rea+params-s{s}" / "results.json").read_text())
        assert r["screening"]["proxy"] == "params" and r["screening"]["pool"] == 12
        lines = (tmp_path / "b" / "runs" / f"rea+params-s{s}" / "candidates.jsonl").read_text().splitlines()
        scores = [json.loads(line).get("proxy_score") for line in lines]
        assert scores[:6] == sorted(scores[:6], reverse=True) and scores[6:] == [None] * 9
    for r in rows:
        assert r["budget"] == 15 and r["seeds"] == [0, 1] and len(r["per_seed"]) == 2
        assert r["best_val_acc"] == pytest.approx(np.mean(r["per_seed"]))
        assert len(r["curve_mean"]) == 15 and r["curve_mean"][-1] == pytest.approx(r["best_val_acc"])
        assert (r["tau"] is None) == (not r["algo"].startswith("predictor"))
    for s in (0, 1):  # the two predictors' runs are the same search but for the ranker
        a = json.loads((tmp_path / "b" / "runs" / f"predictor-gae-s{s}" / "results.json").read_text())
        b = json.loads((tmp_path / "b" / "runs" / f"predictor-dcl-s{s}" / "results.json").read_text())
        assert a["predictor"]["predictor"] == "gae" and b["predictor"]["predictor"] == "dcl"
    assert (tmp_path / "b" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 0  # a rerun reuses the finished runs: the same report
    assert json.loads((tmp_path / "b" / "results.json").read_text())["rows"] == rows
    capsys.readouterr()
