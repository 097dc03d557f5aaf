"""A budget on the found model's cost: the flag's forms, and a derivation that keeps within it exactly (equal to
brute force over every genotype of a cell), returns the space's own derivation when that fits, and refuses in one
line when nothing can fit."""
import itertools

import numpy as np
import pytest

from conftest import one_line_error

from ktnas.engine.profile.cost import CostModel
from ktnas.engine.search.budget import best_within, cell_front, derive_within, parse_budget, node_options, node_groups
from ktnas.engine.spaces import get_space
from ktnas.engine.spaces.base import softmax

BUILD = {"darts": dict(num_classes=10, layers=3, channels=8, in_channels=24, in_size=16),
         "nb201": dict(num_classes=10, layers=5, channels=8, in_channels=24, in_size=16)}


@pytest.fixture(scope="module")
def models():
    return {name: CostModel(get_space(name), build) for name, build in BUILD.items()}


def test_parse_budget():
    assert parse_budget("params=1.5M,flops=300M") == {"params": 1.5e6, "flops": 3e8}
    assert parse_budget("flops = 2.5e3k") == {"flops": 2.5e6} and parse_budget(None) == {}
    one_line_error(lambda: parse_budget("weights=1M"), "give KEY=VALUE pairs, KEY one of params, flops")
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
    one_line_error(lambda: derive_within(sp, w, models["darts"], {"params": 1000}),
                   "no genotype of the darts space fits --budget params=1000", "the smallest needs at least params=")
