"""A budget on the found model's cost: the flag's forms, and a derivation that keeps within it exactly (equal to
brute force over every genotype of a cell), returns the space's own derivation when that fits, and refuses in one
line when nothing can fit."""
import itertools
import json

import numpy as np
import pytest

from conftest import one_line_error

from ktnas.engine.profile.cost import CostModel
from ktnas.engine.search.budget import (BudgetModel, best_within, cell_front, derive_within, parse_budget, node_options,
                                       node_groups)
from ktnas.engine.spaces import get_space
from ktnas.engine.spaces.base import softmax

BUILD = {"darts": dict(num_classes=10, layers=3, channels=8, in_channels=24, in_size=16),
         "nb201": dict(num_classes=10, layers=5, channels=8, in_channels=24, in_size=16)}


@pytest.fixture(scope="module")
def models():
    return {name: BudgetModel(CostModel(get_space(name), build)) for name, build in BUILD.items()}


def test_parse_budget():
    assert parse_budget("params=1.5M,flops=300M") == {"params": 1.5e6, "flops": 3e8}
    assert parse_budget("flops = 2.5e3k") == {"flops": 2.5e6} and parse_budget(None) == {}
    assert parse_budget("latency=4ms,params=2k") == {"latency": 4.0, "params": 2e3}
    assert parse_budget("latency=800us") == {"latency": 0.8} and parse_budget("latency=0.5") == {"latency": 0.5}
    one_line_error(lambda: parse_budget("weights=1M"), "give KEY=VALUE pairs, KEY one of params, flops, latency")
    one_line_error(lambda: parse_budget("latency=4M"), "give KEY=VALUE pairs")
    one_line_error(lambda: parse_budget("params=4ms"), "give KEY=VALUE pairs")
    one_line_error(lambda: parse_budget("params=0"), "the limit must be positive")


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_without_a_binding_budget_it_is_the_spaces_derivation(space, models):
    sp, rng = get_space(space), np.random.default_rng(1)
    for _ in range(5):
        alphas = {t: rng.normal(0, 1, (len(sp.edge_list()), len(sp.ops))) for t in sp.cell_types}
        w = {t: softmax(a) for t, a in alphas.items()}
        assert derive_within(sp, w, models[space], {"params": 1e12}) == sp.derive(alphas)


def test_nb201_equals_brute_force_over_the_whole_space(models):
    """All 5^6 NB201 cells: the best sum of weights within each budget, found by enumeration."""
    sp, model, rng = get_space("nb201"), models["nb201"], np.random.default_rng(2)
    every = np.array(list(itertools.product(range(len(sp.ops)), repeat=6)))
    tab = model.table["cell"]
    cost = model.fixed[0] + tab[np.arange(6), every, 0].sum(1)
    macs = model.fixed[1] + tab[np.arange(6), every, 1].sum(1)
    for _ in range(4):
        w = softmax(rng.normal(0, 1, (6, len(sp.ops))))
        score = w[np.arange(6), every].sum(1)
        for q in (0.2, 0.5, 0.8):
            budget = {"params": float(np.quantile(cost, q)), "flops": float(np.quantile(macs, 0.6))}
            fits = (cost <= budget["params"]) & (macs <= budget["flops"])
            g = derive_within(sp, {"cell": w}, model, budget)
            assert sp.encode(g)["cell"] == every[fits][np.argmax(score[fits])].tolist()
            c = model.cost(g)
            assert c.params <= budget["params"] and c.macs <= budget["flops"]


def test_darts_cell_front_equals_brute_force():
    """One DARTS cell over two ops (4 x 12 x 24 x 40 = 46,080 cells): the best within each budget by enumeration."""
    sp, rng = get_space("darts"), np.random.default_rng(3)
    w = rng.uniform(0, 1, (14, 8))
    table = rng.integers(0, 1000, (14, 8, 2)).astype(float)
    pickable = [4, 6]
    nodes = node_groups(sp)
    options = [node_options(w, table, edges, 2, pickable) for edges in nodes]
    idx = np.array(list(itertools.product(*[range(len(o[1])) for o in options])))
    cost = sum(options[n][0][idx[:, n]] for n in range(4))
    score = sum(options[n][1][idx[:, n]] for n in range(4))
    front = cell_front(w, table, nodes, 2, pickable)
    for q in (0.05, 0.3, 0.6, 0.95):
        limit = np.quantile(cost, q, axis=0)
        fits = np.all(cost <= limit, axis=1)
        best, picks = best_within([front], limit)
        assert best == pytest.approx(score[fits].max(), abs=1e-12)
        assert np.all(sum(table[e, k] for e, k in picks[0]) <= limit)


def test_a_budget_nothing_fits_is_refused_in_one_line(models):
    sp = get_space("darts")
    w = {t: softmax(np.zeros((14, 8))) for t in sp.cell_types}
    msg = one_line_error(lambda: derive_within(sp, w, models["darts"], {"params": 1000, "flops": 2000}),
                         "no genotype of the darts space fits --budget params=1,000,flops=2,000")
    least = np.array([min(models["darts"].values(g)[k] for g in sp.cost_probes()) for k in ("params", "flops")])
    # the smallest genotype's own figures, each with its thousands separators (max pooling on every edge is the
    # least of every cost in this space)
    assert f"the smallest needs at least params={least[0]:,.0f}, flops={least[1]:,.0f})" in msg


def _search(store, out, **kw):
    from ktnas.engine.search import SearchConfig, search

    return search(SearchConfig(features=store, out=str(out), epochs=3, batch_size=16, layers=2, channels=4,
                               reductions=(1,), limit=48, progress=False, **kw))


def _built_cost(store, genotype_file):
    """The exported model's cost measured on the network ktnas train builds by default, and its stem."""
    import warnings

    import torch

    from ktnas.cache.stems import get_stem
    from ktnas.cache.store import open_store
    from ktnas.engine.profile.cost import Cost, count, genotype_cost
    from ktnas.engine.spaces import load_genotype

    with open_store(store) as s:
        spec, size, shape = s.attrs["stem"], s.attrs["preprocessing"]["image_size"], s.split("train").shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, m = count(get_stem(spec, "none", size), torch.zeros(1, 3, size, size))
    build = dict(num_classes=10, in_channels=shape[2], in_size=shape[3])
    return genotype_cost(load_genotype(genotype_file), build, stem=Cost(p, m, p, m))


@pytest.mark.parametrize("key", ["params", "flops"])
def test_a_budgeted_search_returns_a_genotype_within_it(search_store, tmp_path, key):
    """A seeded search with a budget at half its unconstrained genotype's cost ends within it, measured on the
    built network; its metrics record the penalty's weight and the cost; refused up front when nothing can fit."""
    free = _built_cost(search_store, _search(search_store, tmp_path / "free", seed=1)["out"] + "/genotype.json")
    value = free.params if key == "params" else free.macs
    cheapest = _built_cost_of_probe(search_store, "max_pool_3x3")  # no weight, no multiply-add on any edge
    limit = max(value // 2, cheapest[key] + 1)
    r = _search(search_store, tmp_path / "within", seed=1, budget=f"{key}={limit}")
    got = _built_cost(search_store, tmp_path / "within" / "genotype.json")
    assert (got.params if key == "params" else got.macs) <= limit < value
    rec = json.loads((tmp_path / "within" / "metrics.jsonl").read_text().splitlines()[-1])["budget"]
    assert rec["cost"] == got.to_json() and rec["limits"] == {key: float(limit)}
    assert r["genotype"] != json.loads((tmp_path / "free" / "genotype.json").read_text())
    one_line_error(lambda: _search(search_store, tmp_path / "none", budget=f"{key}=1000"),
                   f"no genotype of the darts space fits --budget {key}=1,000")
    assert not (tmp_path / "none" / "metrics.jsonl").exists()


def _built_cost_of_probe(store, op):
    """The cost of the genotype with ``op`` on every edge it uses (max pooling: the cheapest there is)."""
    import tempfile

    from ktnas.engine.spaces import get_space

    g = [p for p in get_space("darts").cost_probes() if p.normal[0][0] == op][0]
    with tempfile.TemporaryDirectory() as d:
        g.save(f"{d}/g.json")
        c = _built_cost(store, f"{d}/g.json")
    return {"params": c.params, "flops": c.macs}


def test_a_budgeted_search_resumes_bit_exactly(search_store, tmp_path, monkeypatch):
    """Killed in its second epoch and resumed (the penalty's weight from the checkpoint), a budgeted search ends as
    the uninterrupted one."""
    from conftest import interrupt_search_at

    free = _built_cost(search_store, _search(search_store, tmp_path / "free")["out"] + "/genotype.json")
    budget = f"params={int(free.params * 0.9)}"
    _search(search_store, tmp_path / "full", budget=budget)
    undo = interrupt_search_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _search(search_store, tmp_path / "cut", budget=budget)
    undo()
    _search(search_store, tmp_path / "cut", budget=budget, resume=True)
    for name in ("genotype.json", "metrics.jsonl"):
        a = (tmp_path / "full" / name).read_text()
        b = (tmp_path / "cut" / name).read_text()
        if name == "metrics.jsonl":  # seconds and memory differ; the rest is the same
            strip = lambda t: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "peak_memory_bytes",
                                                                                     "steps", "eval")}
                               for line in t.splitlines()]
            a, b = strip(a), strip(b)
        assert a == b, name


def test_random_search_with_weight_sharing_draws_only_what_fits(search_store, tmp_path):
    """Under --budget every genotype random search evaluates fits (measured on the built network, frozen stem
    included), and so does the one it keeps."""
    from ktnas.engine.spaces import genotype_from_json

    free = _built_cost(search_store, _search(search_store, tmp_path / "free", seed=1)["out"] + "/genotype.json")
    limit = int(free.params * 0.8)
    _search(search_store, tmp_path / "random", seed=1, algo="random", options=dict(candidates=6),
            budget=f"params={limit}")
    assert _built_cost(search_store, tmp_path / "random" / "genotype.json").params <= limit
    rows = json.loads((tmp_path / "random" / "candidates.json").read_text())
    assert len(rows) == 6
    for r in rows:
        genotype_from_json(r["genotype"]).save(tmp_path / "g.json")
        assert _built_cost(search_store, tmp_path / "g.json").params <= limit


def test_evolution_proposes_only_what_fits(search_store, tmp_path):
    """ktnas evolve --budget: every candidate trained (random population and mutants) fits, measured on the network
    ktnas train builds from it, frozen stem included."""
    from ktnas.engine.evolve import evolve
    from ktnas.engine.spaces import genotype_from_json

    free = _built_cost(search_store, _search(search_store, tmp_path / "free", seed=1)["out"] + "/genotype.json")
    limit = int(free.params * 0.8)
    evolve(features=search_store, space="darts", algo="rea", population=3, sample=2, cycles=3, limit=48,
           batch_size=16, layers=1, channels=4, epochs_per_candidate=1, device="cpu", progress=False,
           out=str(tmp_path / "evolve"), budget=f"params={limit}")
    rows = [json.loads(line) for line in (tmp_path / "evolve" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["origin"] for r in rows} == {"random", "mutation"}
    for r in rows:
        genotype_from_json(r["genotype"]).save(tmp_path / "g.json")
        assert _built_cost(search_store, tmp_path / "g.json").params <= limit
