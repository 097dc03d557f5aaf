"""Search spaces, genotypes (derivation, strings, JSON files, sampling) and the candidate operations."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from ktnas.cache.errors import KtnasError
from ktnas.engine.ops import OPS, conv_body, has_params
from ktnas.engine.spaces import (DARTS_OPS, NB201_OPS, SPACES, DartsGenotype, NB201Genotype, alpha_entropy, count_skips,
                                 derive_darts, derive_nb201, get_space, load_genotype, random_genotype)
from ktnas.kernels import edge_relu

NB201_STR = "|nor_conv_3x3~0|+|skip_connect~0|none~1|+|avg_pool_3x3~0|nor_conv_1x1~1|skip_connect~2|"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- spaces
def test_spaces_and_edges():
    darts, nb201 = get_space("darts"), get_space("nb201")
    assert (darts.edges, nb201.edges) == (14, 6)
    assert darts.ops == DARTS_OPS and nb201.ops == NB201_OPS
    assert len(darts.edge_list()) == 14 and len(nb201.edge_list()) == 6
    assert darts.edge_list()[:5] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert nb201.edge_list() == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    assert darts.pool_bn and not nb201.pool_bn
    with pytest.raises(KtnasError, match="unknown search space 'nasnet'"):
        get_space("nasnet")


# ------------------------------------------------------------------------------------------------ derivation
def _darts_alpha(entries):
    a = np.zeros((14, len(DARTS_OPS)))
    for (edge, op), v in entries.items():
        a[edge, DARTS_OPS.index(op)] = v
    return a


def test_derive_darts_hand_made():
    normal = _darts_alpha({
        (0, "sep_conv_3x3"): 2, (1, "skip_connect"): 1,                          # node 0: edges 0, 1
        (2, "none"): 10, (2, "dil_conv_3x3"): 1, (3, "sep_conv_5x5"): 1.5,      # node 1: edges 2..4
        (4, "max_pool_3x3"): 1,
        # node 2: input 0 has the largest raw non-none logit (3), but 'none' (20) leaves it ~0 after softmax
        (5, "none"): 20, (5, "avg_pool_3x3"): 3, (6, "dil_conv_5x5"): 2, (8, "skip_connect"): 1,
        (13, "sep_conv_3x3"): 3, (9, "avg_pool_3x3"): 2.5,                      # node 3: edges 9..13
    })
    g = derive_darts(torch.tensor(normal), np.zeros((14, 8)))
    assert g.normal == [("sep_conv_3x3", 0), ("skip_connect", 1),
                        ("sep_conv_5x5", 1), ("max_pool_3x3", 2),
                        ("dil_conv_5x5", 1), ("skip_connect", 3),
                        ("sep_conv_3x3", 4), ("avg_pool_3x3", 0)]
    # all ties: DARTS' stable sort keeps the first two edges and the first non-none op
    assert g.reduce == [("max_pool_3x3", 0), ("max_pool_3x3", 1)] * 4
    assert g.normal_concat == g.reduce_concat == [2, 3, 4, 5]
    assert count_skips(g) == 2
    with pytest.raises(KtnasError, match="shape"):
        derive_darts(np.zeros((13, 8)), np.zeros((14, 8)))


def test_derive_nb201_argmax_includes_none():
    best = ["nor_conv_3x3", "none", "skip_connect", "avg_pool_3x3", "nor_conv_1x1", "none"]
    a = np.random.default_rng(0).standard_normal((6, 5))
    for e, op in enumerate(best):
        a[e, NB201_OPS.index(op)] = 5
    g = derive_nb201(torch.tensor(a))
    assert g.to_string() == "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|none~2|"
    assert count_skips(g) == 1


def test_alpha_entropy():
    for k in (5, 8):
        assert alpha_entropy(np.zeros((14, k))) == pytest.approx(math.log(k))
    assert alpha_entropy(torch.eye(5) * 100) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------- genotypes
def test_nb201_string_round_trip():
    g = NB201Genotype.from_string(NB201_STR)
    assert g.edges == [[("nor_conv_3x3", 0)], [("skip_connect", 0), ("none", 1)],
                       [("avg_pool_3x3", 0), ("nor_conv_1x1", 1), ("skip_connect", 2)]]
    assert g.to_string() == str(g) == NB201_STR
    for bad in ("", "nor_conv_3x3~0", "|nor_conv_3x3~a|", "|nor_conv_3x3|", "|conv_7x7~0|", "|none~1|",
                "|none~0|+|none~0|"):
        with pytest.raises(KtnasError):
            NB201Genotype.from_string(bad)


def test_json_file_round_trip(tmp_path):
    d = random_genotype("darts", np.random.default_rng(1))
    n = NB201Genotype.from_string(NB201_STR)
    for g, name in ((d, "d/genotype.json"), (n, "n.json")):
        path = g.save(tmp_path / name)
        back = load_genotype(path)
        assert type(back) is type(g) and back == g
        assert json.loads(path.read_text())["space"] == ("darts" if g is d else "nb201")
    assert json.loads((tmp_path / "n.json").read_text())["arch_str"] == NB201_STR
    assert NB201Genotype.from_json({"space": "nb201", "arch_str": NB201_STR}) == n


@pytest.mark.parametrize("content,problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"space": "nasnet"}', "not one of"),
    ('{"space": "darts", "normal": []}', "lacks key"),
    ('{"space": "darts", "normal": [["sep_conv_3x3", 0], ["conv_9x9", 1]], "normal_concat": [2], '
     '"reduce": [["sep_conv_3x3", 0], ["skip_connect", 1]], "reduce_concat": [2]}', "unknown op 'conv_9x9'"),
    ('{"space": "darts", "normal": [["sep_conv_3x3", 0], ["skip_connect", 2]], "normal_concat": [2], '
     '"reduce": [["sep_conv_3x3", 0], ["skip_connect", 1]], "reduce_concat": [2]}', "input 2 out of range"),
    ('{"space": "darts", "normal": [["sep_conv_3x3", 0], ["skip_connect", "1"]], "normal_concat": [2], '
     '"reduce": [["sep_conv_3x3", 0], ["skip_connect", 1]], "reduce_concat": [2]}', "string, integer"),
    ('{"space": "darts", "normal": [["sep_conv_3x3", 0], ["skip_connect", 1]], "normal_concat": [7], '
     '"reduce": [["sep_conv_3x3", 0], ["skip_connect", 1]], "reduce_concat": [2]}', "normal_concat"),
    ('{"space": "nb201", "edges": [[["none", 0]], [["none", 0], ["none", 3]]]}', "nb201 node 2"),
    ('{"space": "nb201", "arch_str": "|none~0|+|none~0|none~1|", "edges": [[["none", 0]]]}', "disagrees"),
])
def test_malformed_files(tmp_path, content, problem):
    path = tmp_path / "genotype.json"
    path.write_text(content)
    with pytest.raises(KtnasError, match=problem) as e:
        load_genotype(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg


def test_missing_file(tmp_path):
    with pytest.raises(KtnasError, match="no such genotype file"):
        load_genotype(tmp_path / "nope.json")


def test_random_genotypes_are_valid():
    seen = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        d = random_genotype(get_space("darts"), rng)
        for cell in (d.normal, d.reduce):
            assert len(cell) == 8 and all(op in DARTS_OPS and op != "none" for op, _ in cell)
            for i in range(4):
                (_, a), (_, b) = cell[2 * i:2 * i + 2]
                assert a != b and 0 <= a < 2 + i and 0 <= b < 2 + i
        assert DartsGenotype.from_json(d.to_json()) == d
        n = random_genotype("nb201", rng)
        assert NB201Genotype.from_string(n.to_string()) == n
        seen.update(op for node in n.edges for op, _ in node)
    assert seen == set(NB201_OPS)


# ------------------------------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(7, 7), (9, 9), (7, 9)])
def test_op_shapes(stride, hw):
    x = torch.randn(2, 6, *hw)
    for name, build in OPS.items():
        y = build(6, stride, True)(x)
        assert y.shape == (2, 6, -(-hw[0] // stride), -(-hw[1] // stride)), name


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("C", [6, 5])
def test_op_equals_bn_of_conv_body(stride, C):
    torch.manual_seed(0)
    x = torch.randn(3, C, 9, 7, dtype=torch.float64)
    for name in OPS:
        if not has_params(name, stride):
            with pytest.raises(KtnasError, match="parameter-free"):
                conv_body(name, C, stride)
            continue
        op = OPS[name](C, stride, False).double()
        body = conv_body(name, C, stride).double()
        body.load_state_dict(op.body.state_dict())
        want = nn.BatchNorm2d(C, affine=False).double()(body(edge_relu(x)))
        torch.testing.assert_close(op(x), want, rtol=1e-12, atol=1e-12, msg=name)


def test_param_free_lists():
    from ktnas.kernels.reference import FREE_OPS

    for space, free in {name: tuple(o for o in FREE_OPS if o in s.ops) for name, s in SPACES.items()}.items():
        assert set(free) <= set(SPACES[space].ops)
        assert all(not has_params(name, 1) for name in free)
        assert {n for n in SPACES[space].ops if not has_params(n, 1)} == set(free)
    assert has_params("skip_connect", 2) and not has_params("avg_pool_3x3", 2)
