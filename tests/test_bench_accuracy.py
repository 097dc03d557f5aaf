"""ktnas bench accuracy: the whole comparison (precompute, both searches, both trainings, evaluate) really runs,
at a tiny budget, and its report holds what the docs' table needs. No timing or accuracy is asserted beyond
what is true by construction."""
import json
import shutil

import numpy as np

import pytest

from ktnas.engine.cli import main


def test_bench_accuracy_end_to_end(tmp_path, capsys):
    # the supernets at their default widths (the classic one is DARTS' full network): one search step of 8 images
    out = tmp_path / "ba"
    argv = ["bench", "accuracy", "--dataset", "synthetic:160/64", "--stem", "mobilenet_v2:features.1", "--weights",
            "none", "--image-size", "32", "--search-epochs", "1", "--search-limit", "16", "--batch-size", "8",
            "--train-epochs", "1", "--train-limit", "32", "--train-layers", "3", "--train-channels", "4",
            "--train-batch-size", "32", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["kt-nas", "classic"]
    kt, classic = rows["kt-nas"], rows["classic"]
    assert kt["precompute_s"] > 0 and classic["precompute_s"] == 0
    for r in rows.values():
        assert r["search_s"] > 0 and r["search_wall_s"] >= r["search_s"] and r["cost_s"] >= r["search_s"]
        assert r["peak_mem_bytes"] > 0 and 0 <= r["test_acc"] <= 100 and 0 <= r["search_val_acc"] <= 1
        assert r["genotype"].startswith("normal=") or "|" in r["genotype"], r["genotype"]
        assert (r["device"], r["batch"], r["search_samples"], r["search_epochs"]) == ("cpu", 8, 16, 1)
    assert classic["cost_vs_classic"] == 1 and classic["acc_minus_classic"] == 0
    assert kt["acc_minus_classic"] == pytest.approx(kt["test_acc"] - classic["test_acc"])
    assert 0 <= kt["raw_test_acc"] <= 100
    # the classic search is the classic network (all 8 cells from images); KT-NAS searches fewer cells
    assert classic["params"] > kt["params"]
    # every phase's command is in the report, to be rerun by itself
    md = (out / "results.md").read_text()
    for phase in ("precompute:", "kt-nas-darts-s0 search:", "classic-darts-s0 search:", "kt-nas-darts-s0 train:",
                  "classic-darts-s0 train:", "kt-nas-darts-s0 evaluate:"):
        assert phase in md
    assert "`ktnas search --stem none --dataset synthetic:160/64" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun reuses every finished phase (and its recorded seconds): the same rows
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == data["rows"]
    assert "- precompute: `ktnas precompute-features" not in (out / "results.md").read_text()
    capsys.readouterr()


def test_bench_accuracy_seeds_algorithms_random_baseline_and_resume(tmp_path, capsys):
    """Two seeds x {darts, gdas} x {KT-NAS, classic} + a random architecture per seed: mean and spread rows; a
    run whose phases were lost (a search and a training deleted, as if killed before they wrote anything) is
    finished by a rerun, which redoes only those, to the same architectures and accuracies."""
    out = tmp_path / "bs"
    argv = ["bench", "accuracy", "--dataset", "synthetic:160/64", "--stem", "mobilenet_v2:features.1", "--weights",
            "none", "--image-size", "32", "--search-epochs", "1", "--search-limit", "16", "--batch-size", "8",
            "--train-epochs", "1", "--train-limit", "32", "--train-layers", "3", "--train-channels", "4",
            "--train-batch-size", "32", "--device", "cpu", "--algos", "darts,gdas", "--seeds", "0,1",
            "--random-baseline", "--search-channels", "2", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    # --search-channels: the classic supernet's width; KT-NAS's doubled for the one stage its 16x16 stem replaces
    for r in rows[:4]:
        assert r["supernet"] == ({"layers": 8, "channels": 2, "reductions": [2, 5]} if r["config"] == "classic"
                                 else {"layers": 5, "channels": 4, "reductions": [2]}), r["supernet"]
    assert [(r["config"], r["algo"]) for r in rows] == [("kt-nas", "darts"), ("classic", "darts"), ("kt-nas", "gdas"),
                                                      ("classic", "gdas"), ("random", "-")]
    for r in rows:
        accs = [x["test_acc"] for x in r["runs"]]
        assert r["seeds"] == [0, 1] and r["test_acc"] == pytest.approx(np.mean(accs))
        assert r["test_acc_sd"] == pytest.approx(np.std(accs, ddof=1)) and r["skips"] is not None
    assert rows[0]["cost_vs_classic"] == pytest.approx(rows[0]["cost_s"] / rows[1]["cost_s"])
    assert rows[2]["acc_minus_classic"] == pytest.approx(rows[2]["test_acc"] - rows[3]["test_acc"])
    assert rows[4]["cost_s"] == 0 and rows[4]["runs"][0]["genotype"] != rows[4]["runs"][1]["genotype"]
    md = (out / "results.md").read_text()
    assert "kt-nas gdas per seed: seed 0 " in md and "random-s1 train:" in md and "supernet 5 cells C=4" in md

    def outcome(rows):
        return [[(x["seed"], x["genotype"], x["test_acc"]) for x in r["runs"]] for r in rows]

    (work,) = (out / "runs").iterdir()  # one folder per budget
    for run in ("kt-nas-gdas-s1-search", "kt-nas-gdas-s1-train", "classic-darts-s1-train"):
        shutil.rmtree(work / run)
    capsys.readouterr()
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    assert outcome(again) == outcome(rows)
    assert again[1]["runs"][0]["search_s"] == rows[1]["runs"][0]["search_s"]  # reused, not re-measured


def test_bench_accuracy_quick(tmp_path, capsys):
    """--quick (the test-sized run): its budget is what docs/benchmarks/accuracy.md says, at half width, both ways."""
    # a data set smaller than the budget (the report records the budget asked for): the phases run on 32 images
    out = tmp_path / "q"
    assert main(["bench", "accuracy", "--quick", "--dataset", "synthetic:32/16", "--stem", "mobilenet_v2:features.1",
                 "--weights", "none", "--image-size", "32", "--batch-size", "32", "--device", "cpu",
                 "--out", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    kt, classic = rows["kt-nas"], rows["classic"]
    for r in (kt, classic):
        assert (r["search_epochs"], r["search_samples"]) == (1, 512)
    assert (kt["supernet"]["channels"], classic["supernet"]["channels"]) == (16, 8)
    assert "5 cells, C=8, 2 epochs" in (out / "results.md").read_text()
    capsys.readouterr()


def test_bench_accuracy_failing_phase_is_one_line(tmp_path, capsys):
    assert main(["bench", "accuracy", "--dataset", "no-such-set", "--device", "cpu", "--quick",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "precompute-features" in err[0] and "precompute.log" in err[0], err
