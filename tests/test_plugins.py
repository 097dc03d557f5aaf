"""Plug-ins: an algorithm (with an option of its own) and a search space, each one file, run through every command
that takes one, with no change anywhere else in ktnas."""
import json
import re

import numpy as np
import pytest
import torch
from conftest import one_line_error

from ktnas.engine.algorithms import ALGORITHMS, Algorithm, register_algorithm
from ktnas.engine.cli import main
from ktnas.engine.search.loop import search


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


# ---------------------------------------------------------------------------------- plug-ins from outside ktnas
# Each is one file, loaded through KTNAS_PLUGINS: nothing else in ktnas changes for it.
TOY_ALGORITHM = '''
"""DARTS' first order with an architecture step every ``every`` steps only: an algorithm with an option of its own."""
import dataclasses
from dataclasses import field

from ktnas.engine.algorithms import Algorithm, register_algorithm


@dataclasses.dataclass
class EveryOptions:
    every: int = field(default=3, metadata=dict(help="steps between two architecture steps"))


@register_algorithm
class Every(Algorithm):
    name = "every-toy"
    Options = EveryOptions
    variants = {"every-toy-2": {"every": 2}}

    def step(self, epoch, xt, yt, xv, yv, gen, rng):
        self.seen = getattr(self, "seen", 0) + 1
        if self.seen % self.opts.every == 0:
            self.arch_step(xt, yt, xv, yv)
            self.arch_steps = getattr(self, "arch_steps", 0) + 1
        return self.run.weight_step(xt, yt)

    def epoch_info(self, epoch):
        return {"arch_steps": getattr(self, "arch_steps", 0)}
'''

TOY_SPACE = '''
"""A NAS-Bench-201-style cell of two nodes (3 edges) over 3 ops: a space of 27 architectures."""
from dataclasses import dataclass
from typing import ClassVar

from ktnas.engine.spaces.base import register_space
from ktnas.engine.spaces.nb201 import NB201Genotype, NB201Space


@dataclass
class Tiny3Genotype(NB201Genotype):
    space_name: ClassVar[str] = "tiny3"
    OPS: ClassVar[tuple] = ("none", "skip_connect", "nor_conv_3x3")


class Tiny3Space(NB201Space):
    name, ops, steps, edges, genotype = "tiny3", Tiny3Genotype.OPS, 2, 3, Tiny3Genotype
    reference = {"search": (5, 8), "eval": (5, 8)}
    proxy = (5, 8)
    text_form, json_keys = None, ()


register_space(Tiny3Space())
'''


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    """The two plug-in files, named in KTNAS_PLUGINS; the registries and modules are as before afterwards."""
    import sys

    from ktnas.engine.spaces import SPACES

    d = tmp_path_factory.mktemp("plugins")
    (d / "toy_algorithm.py").write_text(TOY_ALGORITHM)
    (d / "toy_space.py").write_text(TOY_SPACE)
    mp = pytest.MonkeyPatch()
    mp.setenv("KTNAS_PLUGINS", f"{d / 'toy_algorithm.py'},{d / 'toy_space.py'}")
    yield d
    mp.undo()
    ALGORITHMS.pop("every-toy", None)
    SPACES.pop("tiny3", None)
    for name in [m for m in sys.modules if m.startswith("ktnas_plugin_")]:
        del sys.modules[name]


def _rows(out):
    return json.loads((out / "results.json").read_text())["rows"]


TINY = ["--epochs", "2", "--batch-size", "8", "--layers", "2", "--channels", "4", "--limit", "48", "--device", "cpu",
        "--quiet"]


def test_plugin_algorithm_with_its_own_option(plugins, store, tmp_path, capsys):
    """`ktnas search --algo every-toy --every 2`: its option in the help with its default, in config.json, acting on
    the steps; refused for another algorithm; its variant timed by `ktnas bench search` and profiled by `ktnas bench
    step`."""
    with pytest.raises(SystemExit):
        main(["search", "--algo", "every-toy", "--help"])
    assert re.search(r"--every EVERY\s+steps between two architecture steps \(default: 3\)", capsys.readouterr().out)
    out = tmp_path / "run"
    assert main(["search", "--features", store, "--out", str(out), "--algo", "every-toy", "--every", "2",
                 "--reductions", "1", *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["options"] == {"every": 2}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["arch_steps"] for r in rows] == [0, 1]  # 3 steps an epoch (24 samples, batch 8): step 2 of epoch 1
    capsys.readouterr()
    assert main(["search", "--features", store, "--out", str(tmp_path / "r2"), "--every", "2", *TINY]) == 2
    assert "--every is an option of every-toy, not of --algo darts: use --algo every-toy" in capsys.readouterr().err
    bench = tmp_path / "bench"
    assert main(["bench", "search", "--features", store, "--algos", "every-toy-2", "--spaces", "darts", "--configs",
                 "cached", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--out",
                 str(bench)]) == 0
    (row,) = _rows(bench)
    assert (row["variant"], row["algo"], row["options"], row["skipped"]) == ("every-toy-2", "every-toy", {"every": 2},
                                                                            None)
    assert main(["bench", "step", "--algos", "every-toy-2", "--spaces", "darts", "--configs", "cached",
                 "--batch-size", "2", "--out", str(tmp_path / "step")]) == 0
    (row,) = _rows(tmp_path / "step")
    assert row["variant"] == "every-toy-2" and row["skipped"] is None and row["launches"] > 0


def test_plugin_space_runs_everywhere(plugins, store, tmp_path, capsys):
    """A space in one file: `ktnas search`, `ktnas evolve`, `ktnas bench search`, `ktnas bench step` and `ktnas
    genotype show` take it by name; its genotypes have its 3 ops and 3 edges."""
    from ktnas.engine.spaces import SPACES, load_genotype

    out = tmp_path / "run"
    assert main(["search", "--features", store, "--out", str(out), "--space", "tiny3", "--reductions", "", *TINY]) == 0
    g = load_genotype(out / "genotype.json")
    assert type(g).__name__ == "Tiny3Genotype" and len([p for node in g.edges for p in node]) == 3
    assert (out / "cell.png").exists()
    with np.load(out / "alphas.npz") as z:
        assert z["cell_e001"].shape == (3, 3)
    capsys.readouterr()
    assert main(["genotype", "show", str(out / "genotype.json")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["space"] == "tiny3"
    ev = tmp_path / "evolve"
    assert main(["evolve", "--features", store, "--out", str(ev), "--space", "tiny3", "--algo", "rea",
                 "--population", "2", "--sample", "2", "--cycles", "1", "--layers", "2", "--channels", "4",
                 "--epochs-per-candidate", "1", "--batch-size", "8", "--limit", "48", "--device", "cpu",
                 "--quiet"]) == 0
    history = [json.loads(line) for line in (ev / "candidates.jsonl").read_text().splitlines()]
    assert len(history) == 3 and all(h["genotype"]["space"] == "tiny3" for h in history)
    bench = tmp_path / "bench"
    assert main(["bench", "search", "--features", store, "--algos", "darts-1", "--spaces", "tiny3", "--configs",
                 "cached", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--out",
                 str(bench)]) == 0
    (row,) = _rows(bench)
    assert row["space"] == "tiny3" and row["skipped"] is None and row["arch_changed"]
    assert main(["bench", "step", "--algos", "darts-1", "--spaces", "tiny3", "--configs", "cached",
                 "--batch-size", "2", "--out", str(tmp_path / "step")]) == 0
    (row,) = _rows(tmp_path / "step")
    assert row["space"] == "tiny3" and row["skipped"] is None and row["launches"] > 0
    assert "tiny3" in SPACES


def test_a_broken_plugin_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.py").write_text("raise RuntimeError('half written')\n")
    monkeypatch.setenv("KTNAS_PLUGINS", str(tmp_path / "broken.py"))
    assert main(["search", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.py" in err and "RuntimeError: half written" in err
