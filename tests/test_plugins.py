"""A new search algorithm is one class and a registry line: a toy one registered here runs through `ktnas search`."""
import json

import numpy as np
import pytest
import torch
from conftest import one_line_error

from ktnas.engine.algorithms import ALGORITHMS, Algorithm, register_algorithm
from ktnas.engine.cli import main
from ktnas.engine.search import search


class FrozenArchitecture(Algorithm):
    """Trains the supernet's weights under the uniform relaxation and never steps the alphas (a 'no search'
    control): every step is a weight step; the genotype is derived from the untouched alphas."""
    name = "frozen-toy"

    def step(self, epoch, xt, yt, xv, yv, gen, rng):
        self.steps = getattr(self, "steps", 0) + 1
        return self.run.weight_step(xt, yt)

    def epoch_info(self, epoch):
        return {"toy_steps": getattr(self, "steps", 0)}


@pytest.fixture
def toy():
    register_algorithm(FrozenArchitecture)
    yield FrozenArchitecture
    del ALGORITHMS[FrozenArchitecture.name]


@pytest.fixture
def store(search_store):
    return search_store


def test_registered_algorithm_runs_through_ktnas_search(toy, store, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["search", "--features", store, "--out", str(out), "--algo", toy.name, "--epochs", "2", "--batch-size",
            "16", "--layers", "2", "--channels", "4", "--reductions", "1", "--limit", "48", "--device", "cpu",
            "--quiet"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["toy_steps"] for r in rows] == [0, 2]  # the loop asked the toy for its epoch info, before each epoch
    config = json.loads((out / "config.json").read_text())
    assert config["algo"] == toy.name and config["lr"] == 0.025  # the base class's (DARTS') paper defaults
    with np.load(out / "alphas.npz") as z:  # the alphas never moved: the toy's steps are weight steps only
        assert np.array_equal(z["normal_e000"], z["normal_e001"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(ckpt) >= {"model", "w_opt", "a_opt", "sched", "epoch", "history", "config", "rng"}
    assert (out / "genotype.json").exists() and (out / "normal.png").exists()
    assert "genotype normal=" in capsys.readouterr().out


def test_unknown_algorithm_refused(store, tmp_path):
    with pytest.raises(SystemExit):  # argparse: not among the registered algorithms
        main(["search", "--features", store, "--out", str(tmp_path / "r"), "--algo", "frozen-toy", "--quiet"])
    one_line_error(lambda: search(features=store, out=str(tmp_path / "r"), algo="frozen-toy"), "unknown --algo")
