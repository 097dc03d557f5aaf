"""The cost of a genotype, exact: weights and multiply-adds of the built network equal the peers' own figures for
their published cells, and the cost model (a sum over edges) equals the built network's count for every genotype
of both spaces; its expected cost is that sum under op probabilities, differentiable."""
import numpy as np
import pytest
import torch

from ktnas.engine.genotypes import parse_genotype
from ktnas.engine.profile.cost import Cost, CostModel, count, genotype_cost
from ktnas.engine.spaces import get_space

DARTS_V2 = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
            "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
            "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
            "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
            "('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")
NB201_BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
SMALL = {"darts": dict(num_classes=10, layers=4, channels=8, in_channels=24, in_size=16),
         "nb201": dict(num_classes=10, layers=5, channels=8, in_channels=24, in_size=16)}


@pytest.mark.parametrize("genotype, params, macs", [(DARTS_V2, 3_349_342, 528_359_040),
                                                     (NB201_BEST, 1_288_506, 184_730_240)])
def test_published_cells_cost_what_their_papers_code_counts(genotype, params, macs):
    """DARTS V2 in DARTS' NetworkCIFAR (C=36, 20 cells, no auxiliary head): 3,349,342 weights, 528.36 M
    multiply-adds; NB201's best CIFAR-10 cell in AutoDL's TinyNetwork: 1,288,506 weights, 184.73 M."""
    cost = genotype_cost(parse_genotype(genotype), dict(num_classes=10))
    assert (cost.params, cost.macs) == (params, macs)
    if genotype == DARTS_V2:  # the auxiliary head trains only: never in the cost
        assert genotype_cost(parse_genotype(genotype), dict(num_classes=10, auxiliary=True)) == cost


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_cost_model_equals_the_built_network(space):
    sp, build = get_space(space), SMALL[space]
    model = CostModel(sp, build, stem=Cost(1000, 5000, 1000, 5000))
    rng = np.random.default_rng(0)
    genotypes = [sp.random_genotype(rng) for _ in range(6)] + sp.cost_probes()[:2]
    for g in genotypes:
        assert model.cost(g) == genotype_cost(g, build, stem=Cost(1000, 5000, 1000, 5000)), sp.short(g)
    # the expected cost under one-hot probabilities is the genotype's (no node takes one input twice here)
    g = genotypes[0]
    onehot = {t: torch.eye(len(sp.ops), dtype=torch.float64)[idx] for t, idx in sp.encode(g).items()}
    c = model.cost(g)
    assert model.expected(onehot).tolist() == [c.params, c.macs]
    # differentiable in the probabilities: d E[cost] / d p = the table
    probs = {t: torch.full((len(sp.edge_list()), len(sp.ops)), 1 / len(sp.ops), dtype=torch.float64,
                           requires_grad=True) for t in sp.cell_types}
    model.expected(probs)[0].backward()
    t = sp.cell_types[0]
    assert torch.equal(probs[t].grad, torch.as_tensor(model.table[t][..., 0], dtype=torch.float64))


def test_a_node_taking_one_input_twice_costs_both_ops():
    """Published cells may feed one input to both ops of a node: two modules, two costs."""
    sp, build = get_space("darts"), SMALL["darts"]
    g = parse_genotype(DARTS_V2.replace("('skip_connect', 0), ('dil_conv_3x3', 2)", "('sep_conv_5x5', 2), "
                                        "('dil_conv_3x3', 2)"))
    assert CostModel(sp, build).cost(g) == genotype_cost(g, build)


def test_count_of_a_plain_module():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count(conv, torch.zeros(1, 3, 10, 10)) == (3 * 8 * 9, 3 * 8 * 9 * 100)
