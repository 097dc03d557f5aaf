"""ktnas bench small-budget: search methods at a small budget against random architectures trained alike."""
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from ktnas.bench.small_budget import DEMO_SEARCH, DEMO_TRAIN, agreement, parse_method
from ktnas.cache.errors import KtnasError
from ktnas.engine.cli import main
from ktnas.engine.spaces import get_space, load_genotype

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from ktnas.cache.precompute import precompute

    out = tmp_path_factory.mktemp("small-budget") / "s.zarr"
    with pytest.warns(UserWarning):  # random stem weights
        precompute(dataset="synthetic:64/32", stem="mobilenet_v2:features.1", weights="none", image_size=32,
                   out=str(out), progress=False)
    return str(out)


def test_methods_seeds_random_architectures_and_resume(store, tmp_path, capsys):
    """Two methods x two seeds and three random architectures: each method's mean and sd over its seeds, its
    genotypes' agreement, its place among the random ones; a rerun after losing a search and a training redoes
    only those, to the same genotypes and accuracies."""
    out = tmp_path / "b"
    argv = ["bench", "small-budget", "--features", store, "--methods", "darts@paper,darts@short:2", "--seeds", "0,1",
            "--random", "3", "--search-epochs", "1", "--search-limit", "48", "--search-layers", "2",
            "--search-channels", "4", "--search-reductions", "1", "--search-batch-size", "16", "--train-epochs", "1",
            "--train-limit", "32", "--train-layers", "2", "--train-channels", "4", "--train-batch-size", "16",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["darts@paper", "darts@short:2", "random (n=3)"]
    rand = [x["test_acc"] for x in rows[2]["runs"]]
    assert rows[2]["test_acc"] == pytest.approx(np.median(rand)) and rows[2]["p90"] == pytest.approx(
        np.percentile(rand, 90))
    space = get_space("darts")
    for r, schedule, epochs in ((rows[0], "paper", 1), (rows[1], "short", 2)):
        accs = [x["test_acc"] for x in r["runs"]]
        assert [x["seed"] for x in r["runs"]] == [0, 1] and r["epochs"] == epochs
        assert r["test_acc"] == pytest.approx(np.mean(accs)) and r["test_acc_sd"] == pytest.approx(np.std(accs, ddof=1))
        assert [x["schedule"]["used"] for x in r["runs"]] == [schedule] * 2
        assert r["vs_random_median"] == pytest.approx(r["test_acc"] - np.median(rand))
        assert r["random_percentile"] == pytest.approx(np.mean(np.array(rand) < r["test_acc"])
                                                       + 0.5 * np.mean(np.array(rand) == r["test_acc"]))
        a, b = (space.encode(load_genotype(x["genotype_file"])) for x in r["runs"])
        same = sum(int(np.sum(np.array(a[t]) == np.array(b[t]))) for t in a)
        assert r["stability"] == pytest.approx(same / sum(len(v) for v in a.values()))
        assert 0 < r["entropy_ratio"] <= 1
    md = (out / "results.md").read_text()
    assert "| darts@short:2 | 2 |" in md and "ktnas search --features" in md and (out / "results.png").exists()

    def outcome(rows):
        return [[(x.get("genotype"), x["test_acc"]) for x in r["runs"]] for r in rows]

    (work,) = (out / "runs").iterdir()  # one folder per budget
    for run in ("darts-short-e2-s1-search", "darts-paper-s0-train", "random-2-train"):
        shutil.rmtree(work / run)
    capsys.readouterr()
    assert main(argv) == 0
    assert outcome(json.loads((out / "results.json").read_text())["rows"]) == outcome(rows)


def test_agreement_and_method_refusals():
    space = get_space("darts")
    rng = np.random.default_rng(0)
    g = [space.random_genotype(rng) for _ in range(3)]
    assert agreement(space, [g[0], g[0], g[0]]) == 1.0 and agreement(space, [g[0]]) is None
    codes = [np.concatenate([np.asarray(v) for _, v in sorted(space.encode(x).items())]) for x in g]
    by_hand = np.mean([np.mean(a == b) for a, b in itertools.combinations(codes, 2)])
    assert agreement(space, g) == pytest.approx(by_hand) and by_hand < 1
    assert parse_method("gdas@short:40", 10) == dict(label="gdas@short:40", name="gdas", algo="gdas", options={},
                                                     schedule="short", epochs=40)
    assert parse_method("darts-2", 10)["options"] == {"order": 2} and parse_method("darts-2", 10)["schedule"] == "auto"
    with pytest.raises(KtnasError, match=r"method 'darts@fast': use ALGO\[@SCHEDULE\]\[:EPOCHS\]"):
        parse_method("darts@fast", 10)
    with pytest.raises(KtnasError, match="unknown algorithm 'dart'"):
        parse_method("dart@short", 10)


def test_defaults_are_the_demos():
    """The benchmark's default search and training are `make demo`'s (the Makefile's commands)."""
    make = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    search = re.search(r"ktnas search (.*)", make).group(1)
    train = re.search(r"ktnas train (.*)", make).group(1)

    def flags(line):
        return dict(re.findall(r"--([\w-]+) (\S+)", line))

    s, t = flags(search), flags(train)
    assert {k: s[k.replace("_", "-")] for k in DEMO_SEARCH} == {k: str(v) for k, v in DEMO_SEARCH.items()}
    assert {k: t[k.replace("_", "-")] for k in DEMO_TRAIN} == {k: str(v) for k, v in DEMO_TRAIN.items()}


def test_a_budget_keeps_the_searches_and_random_architectures_within_it(store, tmp_path):
    """--budget params=...: the search's genotype and every random architecture fit the trained model's budget,
    each run reports that model's cost (frozen stem included), and the budget has its own folder of runs."""
    from ktnas.cache.store import open_store
    from ktnas.engine.data import feature_info
    from ktnas.engine.search.budget import budget_model

    space = get_space("darts")
    with open_store(store) as s:
        model = budget_model(space, feature_info(s), True, store=s, layers=2, channels=4)
    limit = int(np.quantile([model.values(g)["params"] for g in space.cost_probes()], 0.4))
    out = tmp_path / "b"
    assert main(["bench", "small-budget", "--features", store, "--methods", "darts@short:1", "--seeds", "0",
                 "--random", "3", "--search-epochs", "1", "--search-limit", "48", "--search-layers", "2",
                 "--search-channels", "4", "--search-reductions", "1", "--search-batch-size", "16",
                 "--train-epochs", "1", "--train-limit", "32", "--train-layers", "2", "--train-channels", "4",
                 "--train-batch-size", "16", "--device", "cpu", "--budget", f"params={limit}", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    (work,) = (out / "runs").iterdir()
    found = [(r, load_genotype(r["genotype_file"])) for r in rows[0]["runs"]]
    drawn = [(r, load_genotype(work / f"random-{r['index']}.json")) for r in rows[1]["runs"]]
    assert len(found) == 1 and len(drawn) == 3
    for run, g in found + drawn:
        assert run["cost"] == model.values(g) and run["cost"]["params"] <= limit
    assert f"within --budget params={limit}" in (out / "results.md").read_text()
