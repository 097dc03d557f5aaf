"""The latency model: the table's layout adds up to the sum over a network's ops, the fit recovers what made the
calibration, the file round-trips and refuses another network in one line, the timed ONNX model computes what the
module does, and a budgeted search (latency) and evolution (Pareto front) keep within the table's prediction."""
import json

import numpy as np
import pytest
import torch

from conftest import one_line_error

from ktnas.engine.profile.latency import Timer, measure_table
from ktnas.engine.profile.latency_table import LatencyModel, LatencyTable, fit, op_shapes, ops_sums, store_target
from ktnas.engine.spaces import get_space

FAST = dict(repeats=2, min_seconds=0.0, rounds=1)  # the timings' values are not what these tests check


@pytest.fixture(scope="module")
def tables(search_store):
    """Tables of both spaces for the network ktnas train builds on the search store at 2 cells, C=4 (PyTorch)."""
    timer = Timer("torch", **FAST)
    out = {}
    for space, layers in (("darts", 2), ("nb201", 5)):
        target = store_target(search_store, space, layers=layers, channels=4)
        out[space] = measure_table(target, timer, calibrate=2, progress=False)
    return out


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_the_table_adds_up_to_the_networks_ops(tables, space):
    """The [edges, ops] layout a search weighs (summed over cells from the probes) predicts, for random genotypes,
    exactly the fixed part plus each op's scale times its latency at its own shape in the built network."""
    table, sp, rng = tables[space], get_space(space), np.random.default_rng(0)
    model = LatencyModel(table)
    for _ in range(20):
        g = sp.random_genotype(rng)
        by_op = ops_sums(table, g)
        direct = table.fixed_ms + sum(table.scales.get(op, 1.0) * ms for op, ms in by_op.items())
        assert model.predict(g) == pytest.approx(direct, rel=1e-12)
        keys = {k for *_, k, _ in op_shapes(sp, g, table.target.build)}
        assert keys <= set(table.ops)


def test_fit_recovers_the_fixed_part_and_scales():
    """Calibration rows made from known fixed = 0.3 ms and scales are fitted back exactly; a scale the data would
    make negative is held at 0."""
    rng = np.random.default_rng(1)
    ops = ("a", "b", "c")
    truth = {"a": 0.5, "b": 1.5, "c": 0.0}
    rows = []
    for _ in range(8):
        sums = {op: float(rng.uniform(0.1, 2.0)) for op in ops}
        rows.append(dict(ops_ms=sums, measured_ms=0.3 + sum(truth[o] * v for o, v in sums.items())))
    fixed, scales = fit(rows, ops)
    assert fixed == pytest.approx(0.3, abs=1e-9)
    assert scales == pytest.approx(truth, abs=1e-9)
    rows = [dict(r, measured_ms=r["measured_ms"] - 0.8 * r["ops_ms"]["c"]) for r in rows]  # c would be -0.8
    assert fit(rows, ops)[1]["c"] == 0.0


def test_the_table_round_trips_and_refuses_another_network(tables, search_store, tmp_path):
    table = tables["darts"]
    path = table.save(tmp_path / "t.json")
    back = LatencyTable.load(path)
    assert back.to_json() == table.to_json()
    rng = np.random.default_rng(2)
    for _ in range(5):
        g = get_space("darts").random_genotype(rng)
        assert LatencyModel(back).predict(g) == LatencyModel(table).predict(g)
    back.require(table.target)
    other = store_target(search_store, "darts", layers=3, channels=4)
    one_line_error(lambda: back.require(other, path), "was measured for another network", "layers=2 (needs 3)",
                   "ktnas bench latency")
    (tmp_path / "x.json").write_text(json.dumps({"format": "something"}))
    one_line_error(lambda: LatencyTable.load(tmp_path / "x.json"), "not a ktnas latency table")
    one_line_error(lambda: LatencyTable.load(tmp_path / "missing.json"), "no such latency table")


def test_the_timed_onnx_model_computes_the_module(tables):
    """What ONNX Runtime times is the module itself: the exported op and whole model give the module's outputs."""
    pytest.importorskip("onnxruntime")
    from ktnas.engine.profile.latency_table import model_for
    from ktnas.engine.train.network import build_network

    target = tables["nb201"].target
    g = get_space("nb201").random_genotype(np.random.default_rng(3))
    timer = Timer("onnxruntime", **FAST)
    try:
        op = build_network(g, **target.build).eval().cells[0].ops[0][0]
        x = torch.randn(1, target.build["channels"], target.build["in_size"], target.build["in_size"])
        run = timer.prepare(op, x)
        torch.testing.assert_close(torch.as_tensor(run()), op(x), rtol=1e-4, atol=1e-5)
        model, images = model_for(target, g), timer.images(target)
        torch.testing.assert_close(torch.as_tensor(timer.prepare(model, images)()), model(images), rtol=1e-4,
                                   atol=1e-4)
    finally:
        timer.close()


def _search(store, out, **kw):
    from ktnas.engine.search import SearchConfig, search

    kw = dict(dict(epochs=3, train_layers=2, train_channels=4), **kw)
    return search(SearchConfig(features=store, out=str(out), batch_size=16, layers=2, channels=4, reductions=(1,),
                               limit=48, progress=False, **kw))


def test_a_latency_budget_at_half_the_free_genotypes_latency(tables, search_store, tmp_path, monkeypatch):
    """A seeded search with --budget latency at half its unconstrained genotype's predicted latency returns a
    genotype within it (by the table it was given); without --latency-table it measures one into the run directory
    and a resumed run reuses it."""
    from ktnas.engine.search import budget as budget_mod
    from ktnas.engine.spaces import load_genotype

    table = tables["darts"]
    path = table.save(tmp_path / "table.json")
    model = LatencyModel(table)
    free = model.predict(load_genotype(_search(search_store, tmp_path / "free", seed=1)["out"] + "/genotype.json"))
    least = min(model.predict(g) for g in get_space("darts").cost_probes())
    limit = max(free / 2, least * 1.001)
    assert limit < free
    r = _search(search_store, tmp_path / "within", seed=1, budget=f"latency={limit}ms", latency_table=str(path))
    got = model.predict(load_genotype(tmp_path / "within" / "genotype.json"))
    assert got <= limit
    rec = json.loads((tmp_path / "within" / "metrics.jsonl").read_text().splitlines()[-1])["budget"]
    assert rec["cost"]["latency_ms"] == pytest.approx(got) and rec["limits"] == {"latency": limit}
    assert r["genotype"] != json.loads((tmp_path / "free" / "genotype.json").read_text())
    one_line_error(lambda: _search(search_store, tmp_path / "other", budget="latency=1ms", latency_table=str(path),
                                   train_layers=3), "was measured for another network")

    monkeypatch.setattr(budget_mod, "SPOT_RUNTIME", "torch")
    monkeypatch.setattr("ktnas.engine.profile.latency.MIN_SECONDS", 0.0)
    _search(search_store, tmp_path / "spot", seed=1, epochs=1, budget=f"latency={limit * 10}ms")
    spot = LatencyTable.load(tmp_path / "spot" / "latency-table.json")
    assert spot.target == table.target and spot.environment["runtime"] == "torch"
    before = (tmp_path / "spot" / "latency-table.json").read_text()
    _search(search_store, tmp_path / "spot", seed=1, epochs=1, budget=f"latency={limit * 10}ms", resume=True)
    assert (tmp_path / "spot" / "latency-table.json").read_text() == before  # reused, not measured again


def test_evolution_keeps_the_pareto_front(tables, search_store, tmp_path):
    """ktnas evolve --objectives accuracy,latency,params: front.json is exactly the candidates no other beats in
    accuracy and both costs (brute force), each candidate's costs are its model's, and pareto.png is drawn."""
    from ktnas.engine.evolve import evolve
    from ktnas.engine.profile.cost import genotype_cost
    from ktnas.engine.spaces import genotype_from_json

    table = tables["nb201"]
    path = table.save(tmp_path / "table.json")
    s = evolve(features=search_store, space="nb201", algo="rea", population=4, sample=3, cycles=6, limit=48,
               batch_size=16, layers=5, channels=4, epochs_per_candidate=1, device="cpu", progress=False,
               out=str(tmp_path / "evolve"), objectives="accuracy,latency,params", train_layers=5, train_channels=4,
               latency_table=str(path))
    rows = [json.loads(line) for line in (tmp_path / "evolve" / "candidates.jsonl").read_text().splitlines()]
    model, stem_params = LatencyModel(table), None
    for r in rows:
        g = genotype_from_json(r["genotype"])
        assert r["deploy"]["latency"] == pytest.approx(model.predict(g))
        net_params = genotype_cost(g, table.target.build).params
        stem_params = stem_params if stem_params is not None else r["deploy"]["params"] - net_params
        assert r["deploy"]["params"] - net_params == stem_params  # the same frozen stem under every candidate

    def beaten(a, b):  # b beats a
        ge = b["val_acc"] >= a["val_acc"] and all(b["deploy"][k] <= a["deploy"][k] for k in ("latency", "params"))
        gt = b["val_acc"] > a["val_acc"] or any(b["deploy"][k] < a["deploy"][k] for k in ("latency", "params"))
        return ge and gt

    expected = {r["index"] for r in rows if not any(beaten(r, o) for o in rows)}
    front = json.loads((tmp_path / "evolve" / "front.json").read_text())
    assert {r["index"] for r in front} == expected == {r["index"] for r in s["front"]}
    assert (tmp_path / "evolve" / "pareto.png").stat().st_size > 0
    one_line_error(lambda: evolve(features=search_store, out=str(tmp_path / "bad"), objectives="latency"),
                   "--objectives 'latency': give accuracy, then any of params, flops, latency")


def test_pareto_front_and_tournament_on_a_hand_made_set():
    """Five candidates (accuracy, ms): the front is b, c, e (a is beaten by b, d by c; e is the cheapest); a
    tournament under cost objectives is won by a member of the front of what it drew."""
    from ktnas.engine.evolve.front import pareto_front
    from ktnas.engine.evolve.proposers import tournament

    pts = {"a": (90.0, 5.0), "b": (91.0, 4.0), "c": (89.0, 2.0), "d": (88.0, 2.0), "e": (80.0, 1.0)}
    rows = [dict(index=k, val_acc=a, deploy={"latency": ms}) for k, (a, ms) in pts.items()]
    assert [rows[i]["index"] for i in pareto_front(rows, ("latency",))] == ["b", "c", "e"]
    twins = rows + [dict(rows[1], index="b2")]  # an identical copy of b: the first of the two is kept
    assert [twins[i]["index"] for i in pareto_front(twins, ("latency",))] == ["b", "c", "e"]
    wins = set()
    for seed in range(100):
        drawn = [rows[i] for i in np.random.default_rng(seed).integers(len(rows), size=3)]
        won = tournament(rows, 3, np.random.default_rng(seed), ("latency",))
        assert won["index"] in {drawn[i]["index"] for i in pareto_front(drawn, ("latency",))}
        wins.add(won["index"])
        best = max(drawn, key=lambda r: r["val_acc"])  # accuracy alone: the most accurate drawn
        assert tournament(rows, 3, np.random.default_rng(seed))["index"] == best["index"]
    assert wins == set(pts)  # every candidate is on the front of some draw (a alone, or with d and e)


def test_bench_latency_writes_the_table_and_goes_on(search_store, tmp_path, monkeypatch, capsys):
    """ktnas bench latency: the table a budget takes, the check's rows (CSV), the report and its PNG; a rerun with
    a larger --check keeps what was measured and measures only the rest; another runtime in the same folder is
    refused in one line."""
    from ktnas.engine.cli import main

    monkeypatch.setattr("ktnas.engine.profile.latency.MIN_SECONDS", 0.0)
    argv = ["bench", "latency", "--features", search_store, "--space", "nb201", "--layers", "5", "--channels", "4",
            "--runtime", "torch", "--calibrate", "1", "--check", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    table = LatencyTable.load(tmp_path / "latency-table-nb201.json")
    assert len(table.check) == 3 and len(table.calibration) == len(get_space("nb201").cost_probes()) + 1
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["n"] == 3 and row["space"] == "nb201"
    assert len((tmp_path / "check-nb201.csv").read_text().splitlines()) == 4
    assert (tmp_path / "results.png").stat().st_size > 0
    assert main(argv[:-3] + ["4", "--out", str(tmp_path)]) == 0
    more = LatencyTable.load(tmp_path / "latency-table-nb201.json")
    assert more.check[:3] == table.check and len(more.check) == 4 and more.ops == table.ops
    capsys.readouterr()
    assert main(argv[:-2] + ["--seed", "1", "--out", str(tmp_path)]) == 2  # other calibration models: refused
    assert "drawn with another --seed" in capsys.readouterr().err
    assert main([a if a != "torch" else "onnxruntime" for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "was measured elsewhere (runtime=torch" in err and "\n" not in err
