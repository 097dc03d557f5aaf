"""Genotypes in the forms people have: ktnas JSON with or without "space", DARTS' Genotype(...) text
(a published architecture, DARTS V2, as in DARTS' genotypes.py), NB201 architecture strings; round trips between
the forms; one-line refusals; ktnas genotype show; and a paper's genotype trained as it is."""

import json

import pytest

from conftest import ktnas, one_line_error

from ktnas.engine.genotypes import format_genotype, parse_genotype
from ktnas.engine.spaces.darts_text import darts_text
from ktnas.engine.spaces import DartsGenotype, NB201Genotype

# DARTS' cnn/genotypes.py, verbatim (its concat as range(2, 6))
DARTS_PY = """from collections import namedtuple
Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')
DARTS_V1 = Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])
DARTS_V2 = Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=range(2, 6), reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=range(2, 6))
DARTS = DARTS_V2
"""
V2 = DARTS_PY.splitlines()[3].split(" = ", 1)[1]
NB201_STR = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|skip_connect~2|"


def test_darts_text_of_a_paper_parses_to_the_genotype():
    g = parse_genotype(V2)
    assert isinstance(g, DartsGenotype)
    assert g.normal[7] == ("dil_conv_3x3", 2) and list(g.normal_concat) == [2, 3, 4, 5]
    assert list(g.reduce_concat) == [2, 3, 4, 5]


def test_a_genotypes_py_file_by_name(tmp_path):
    f = tmp_path / "genotypes.py"
    f.write_text(DARTS_PY)
    assert parse_genotype(f"{f}:DARTS_V2") == parse_genotype(V2)
    assert parse_genotype(f"{f}:DARTS_V1").normal[0] == ("sep_conv_3x3", 1)
    one_line_error(lambda: parse_genotype(f), "2 genotypes in it: pick one as FILE:NAME", "DARTS_V1", "DARTS_V2")
    one_line_error(lambda: parse_genotype(f"{f}:PDARTS"), "no genotype named 'PDARTS'")


# AutoDL-Projects' genotypes (GDAS, CVPR 2019), in its own form: pairs grouped per node, connectN and connects
AUTODL_PY = """from collections import namedtuple
Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat connectN connects')
GDAS_V1 = Genotype(
  normal=[
    (('skip_connect', 0), ('skip_connect', 1)),
    (('skip_connect', 0), ('sep_conv_5x5', 2)),
    (('sep_conv_3x3', 3), ('skip_connect', 0)),
    (('sep_conv_5x5', 4), ('sep_conv_3x3', 3))],
  normal_concat=[2, 3, 4, 5],
  reduce=[
    (('sep_conv_5x5', 0), ('sep_conv_3x3', 1)),
    (('sep_conv_5x5', 2), ('sep_conv_5x5', 1)),
    (('dil_conv_5x5', 2), ('sep_conv_3x3', 1)),
    (('sep_conv_5x5', 0), ('sep_conv_5x5', 1))],
  reduce_concat=[2, 3, 4, 5],
  connectN=None, connects=None
)
SETN = Genotype(
  normal=[(('skip_connect', 0), ('sep_conv_5x5', 1)), (('sep_conv_5x5', 0), ('sep_conv_3x3', 1)),
          (('sep_conv_5x5', 1), ('sep_conv_5x5', 3)), (('max_pool_3x3', 1), ('conv_3x1_1x3', 4))],
  normal_concat=[2, 3, 4, 5],
  reduce=[(('sep_conv_3x3', 0), ('sep_conv_5x5', 1)), (('avg_pool_3x3', 0), ('sep_conv_5x5', 1)),
          (('avg_pool_3x3', 0), ('sep_conv_5x5', 1)), (('avg_pool_3x3', 0), ('skip_connect', 1))],
  reduce_concat=[2, 3, 4, 5],
  connectN=None, connects=None
)
"""


def test_autodl_genotype_form_parses_like_darts(tmp_path):
    """AutoDL's 6-field Genotype (pairs per node, connectN=None) is DARTS' genotype flattened; an op outside the
    DARTS space (SETN's conv_3x1_1x3) and a connectN that is not None are refused in one line."""
    f = tmp_path / "autodl_genotypes.py"
    f.write_text(AUTODL_PY)
    g = parse_genotype(f"{f}:GDAS_V1")
    flat = ("Genotype(normal=[('skip_connect', 0), ('skip_connect', 1), ('skip_connect', 0), ('sep_conv_5x5', 2), "
            "('sep_conv_3x3', 3), ('skip_connect', 0), ('sep_conv_5x5', 4), ('sep_conv_3x3', 3)], "
            "normal_concat=[2, 3, 4, 5], reduce=[('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('sep_conv_5x5', 2), "
            "('sep_conv_5x5', 1), ('dil_conv_5x5', 2), ('sep_conv_3x3', 1), ('sep_conv_5x5', 0), "
            "('sep_conv_5x5', 1)], reduce_concat=[2, 3, 4, 5])")
    assert g == parse_genotype(flat) and darts_text(g) == flat
    one_line_error(lambda: parse_genotype(f"{f}:SETN"), "conv_3x1_1x3")
    one_line_error(lambda: parse_genotype(AUTODL_PY.split("GDAS_V1 = ")[1].split("\nSETN")[0]
                                          .replace("connectN=None", "connectN=[2, 2, 2, 2]")), "connectN is not None")


def test_round_trips_between_the_forms(tmp_path):
    g = parse_genotype(V2)
    assert parse_genotype(darts_text(g)) == g
    assert parse_genotype(format_genotype(g, "json")) == g
    d = json.loads(format_genotype(g, "json"))
    del d["space"]  # ktnas JSON without its space: inferred from the keys
    assert parse_genotype(json.dumps(d)) == g
    n = parse_genotype(NB201_STR)
    assert isinstance(n, NB201Genotype) and format_genotype(n, "nb201") == NB201_STR
    assert parse_genotype(format_genotype(n, "json")) == n
    assert parse_genotype(json.dumps({"arch_str": NB201_STR})) == n
    g.save(tmp_path / "g.json")
    assert parse_genotype(tmp_path / "g.json") == g


@pytest.mark.parametrize("text, match", [
    (V2.replace("sep_conv_3x3", "sep_conv_7x7", 1), "sep_conv_7x7"),
    (V2.replace("('dil_conv_3x3', 2)], ", "], ", 1), "genotype text:"),
    ("Genotype(normal=[('sep_conv_3x3', 0)], normal_concat=[2], reduce=[])", "lacks reduce_concat"),
    ("Genotype(normal=__import__('os').system('true'), normal_concat=[2], reduce=[], reduce_concat=[])",
     "not a literal"),
    ("|nor_conv_3x3~0|+|sep_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|skip_connect~1|skip_connect~2|",
     "sep_conv_3x3"),
    ('{"normal_cell": []}', "needs 'normal' and 'reduce'"),
    ("resnet please", "not a genotype in a known form"),
    ("runs/nothing/genotype.json", "no such genotype file"),
])
def test_refusals_are_one_line(text, match):
    one_line_error(lambda: parse_genotype(text), match)


def test_format_that_does_not_fit_the_space():
    one_line_error(lambda: format_genotype(parse_genotype(NB201_STR), "darts"), "a nb201 genotype has no darts form")


def test_genotype_show_cli(tmp_path):
    r = ktnas("genotype", "show", V2, "--png", tmp_path / "png")
    lines = r.stdout.splitlines()
    assert json.loads(lines[0])["space"] == "darts" and lines[1] == darts_text(parse_genotype(V2))
    assert (tmp_path / "png" / "normal.png").stat().st_size > 1000
    r = ktnas("genotype", "show", NB201_STR, "--format", "nb201")
    assert r.stdout.strip() == NB201_STR
    r = ktnas("genotype", "show", "Genotype(", check=False)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "not valid Python" in r.stderr


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import warnings

    from ktnas.cache.precompute import precompute

    out = tmp_path_factory.mktemp("genotypes") / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precompute(dataset="synthetic:96/32", stem="mobilenet_v2:features.1", weights="none", image_size=32,
                   out=str(out), progress=False)
    return str(out)


@pytest.mark.parametrize("genotype", [V2, NB201_STR], ids=["darts-v2-text", "nb201-string"])
def test_train_takes_a_papers_genotype_as_it_is(store, tmp_path, genotype):
    """ktnas train --genotype with DARTS' own text and with an NB201 string: one tiny epoch, a model written
    whose config holds that genotype."""
    r = ktnas("train", "--features", store, "--genotype", genotype, "--out", tmp_path / "run", "--epochs", "1",
              "--batch-size", "16", "--layers", "3" if genotype == V2 else "2", "--channels", "4", "--device", "cpu",
              "--quiet")
    assert (tmp_path / "run" / "model.pt").exists(), r.stderr[-2000:]
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert parse_genotype(json.dumps(conf["genotype_json"])) == parse_genotype(genotype)
