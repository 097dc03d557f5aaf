"""ktnas bench ranking: the statistics against definitions in float64, and a quick run that trains every
candidate both ways, writes its report, and resumes after an interruption to the same numbers."""
import itertools
import json
import math
import warnings

import numpy as np
import pytest

from conftest import TINY
from ktnas.bench.ranking import bootstrap, compare, ranks, sample_architectures, spearman, top_overlap
from ktnas.cache.precompute import precompute
from ktnas.engine.cli import main
from ktnas.engine.evolve.predictor import kendall_tau
from ktnas.engine.spaces import genotype_str


def _tau_b_by_definition(x, y):
    n0 = c = d = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        n0 += 1
        sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        tx += sx == 0
        ty += sy == 0
        c += sx * sy > 0
        d += sx * sy < 0
    return (c - d) / math.sqrt((n0 - tx) * (n0 - ty))


def test_statistics_match_their_definitions():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 6, 12).astype(float)  # ties on purpose
        y = x + rng.normal(0, 2, 12).round()
        assert kendall_tau(x, y) == pytest.approx(_tau_b_by_definition(x, y), abs=1e-12)
        rx = ranks(x)
        for v in np.unique(x):  # average ranks of ties
            pos = np.flatnonzero(np.sort(x) == v) + 1
            assert (rx[x == v] == pos.mean()).all()
        assert spearman(x, y) == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1], abs=1e-12)
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1) and spearman(x, -x) == pytest.approx(-1)
    assert top_overlap(x, x, 3) == 1 and top_overlap(x, -x, 3) == 0 and top_overlap(x, x[::-1] * 0 + x, 5) == 1
    lo, hi = bootstrap(kendall_tau, x, x + rng.normal(0, 1, 10), 500, 0)
    assert -1 <= lo <= kendall_tau(x, x + 0) and lo < hi <= 1
    row = compare("a", x, -x, reps=100, seed=0, k=3)
    assert row["kendall_tau"] == -1 and row["tau_ci"] == (-1, -1) and row["top_k_overlap"] == 0
    assert compare("tied", x, x * 0, reps=50, seed=0, k=3)["kendall_tau"] is None  # undefined, not nan


def test_sampled_architectures_are_distinct_and_seeded():
    a = sample_architectures("nb201", 30, 1)
    assert len({genotype_str(g) for g in a}) == 30
    assert [genotype_str(g) for g in a] == [genotype_str(g) for g in sample_architectures("nb201", 30, 1)]
    assert [genotype_str(g) for g in a] != [genotype_str(g) for g in sample_architectures("nb201", 30, 2)]


@pytest.fixture(scope="module")
def ranking_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranking") / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64 images: every candidate trains one batch, validates one
        precompute(**dict(TINY, out=str(path), splits=("train",), limit=64))
    return path


def _run(store, out):
    assert main(["bench", "ranking", "--quick", "--features", str(store), "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    lines = (out / "candidates.jsonl").read_text().splitlines()
    return rows, [json.loads(line) for line in lines]


def test_quick_ranking_trains_both_ways_and_resumes_to_the_same_numbers(ranking_store, tmp_path, capsys):
    rows, cands = _run(ranking_store, tmp_path / "a")
    rows = [r for r in rows if not r["comparison"].startswith("the same without")]  # present when one is at chance
    prox, rows_all, rows = [r for r in rows if r["comparison"].startswith("proxy ")], rows, \
        [r for r in rows if not r["comparison"].startswith("proxy ")]
    assert [r["n"] for r in rows] == [6, 4, 4, 6, 6, 6, 6]
    assert [r["comparison"].split(":")[0] for r in rows[3:]] == ["predictor gae"] * 2 + ["predictor dcl"] * 2
    assert all(len(r["folds"]) == 2 for r in rows[3:])
    assert sorted((c["way"], c["epochs"]) for c in cands) == \
        [("classic", 1)] * 6 + [("classic", 2)] * 4 + [("kt", 1)] * 6
    for r in rows[:3]:
        assert r["kendall_tau"] is None or (-1 <= r["kendall_tau"] <= 1 and r["tau_ci"][0] <= r["tau_ci"][1])
    kt = {c["arch"]: c for c in cands if c["way"] == "kt"}
    cl = {c["arch"]: c for c in cands if c["way"] == "classic" and c["epochs"] == 1}
    assert kt.keys() == cl.keys()
    arch = next(iter(kt))
    # KT-NAS cells on the 16x16 cached features; classic: the whole network with its own stem on 32 px images
    assert kt[arch]["network"]["in_channels"] == 16 and cl[arch]["network"]["in_channels"] is None
    assert cl[arch]["flops"] > kt[arch]["flops"]
    assert rows[0]["kendall_tau"] == pytest.approx(kendall_tau([cl[a]["val_acc"] for a in kt],
                                                               [kt[a]["val_acc"] for a in kt]))
    assert (tmp_path / "a" / "results.png").read_bytes()[:4] == b"\x89PNG"
    # the proxies (ktnas rank on the same architectures) against each set of labels, and their combined rank
    scored = [json.loads(line) for line in (tmp_path / "a" / "rank" / "scores.jsonl").read_text().splitlines()]
    names = ["synflow", "snip", "grad_norm", "jacov", "naswot", "zico", "params", "flops", "combined"]
    assert [r["comparison"] for r in prox] == [f"proxy {n} vs {label} labels" for label in
                                               ("KT-NAS", "classic", "classic 2 ep") for n in names]
    order = [x["arch"] for x in scored]
    acc = [kt[a]["val_acc"] for a in order]
    for n in ("synflow", "params"):
        row = next(r for r in prox if r["comparison"] == f"proxy {n} vs KT-NAS labels")
        assert row["kendall_tau"] == pytest.approx(kendall_tau(acc, [x["scores"][n] for x in scored]))
    combined = sum(np.log(ranks([x["scores"][n] for x in scored]) / 6) for n in names[:6])
    row = next(r for r in prox if r["comparison"] == "proxy combined vs classic labels")
    assert row["kendall_tau"] == pytest.approx(kendall_tau([cl[a]["val_acc"] for a in order], combined))
    # a rerun trains nothing and reports the same
    capsys.readouterr()
    again, cands2 = _run(ranking_store, tmp_path / "a")
    again = [r for r in again if not r["comparison"].startswith("the same without")]
    assert again == rows_all and len(cands2) == len(cands) and "ktnas bench ranking: " not in capsys.readouterr().err
    # interrupted after 5 candidates, mid-write of the 6th: the resumed run equals the uninterrupted one
    (tmp_path / "b").mkdir()
    text = (tmp_path / "a" / "candidates.jsonl").read_text().splitlines()
    (tmp_path / "b" / "candidates.jsonl").write_text("\n".join(text[:5]) + "\n" + text[5][:40])
    resumed, cands3 = _run(ranking_store, tmp_path / "b")
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows  # noqa: E731
                            if not r["comparison"].startswith("the same without")]
    assert untimed(resumed) == untimed(rows_all)  # the proxies scored again there: the same scores
    assert {(c["way"], c["epochs"], c["arch"]): c["val_acc"] for c in cands3} == \
        {(c["way"], c["epochs"], c["arch"]): c["val_acc"] for c in cands}
