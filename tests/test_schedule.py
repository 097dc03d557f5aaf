"""The architecture schedule at the search's budget: the paper's, or the short-budget one (a warm-up of the
weights, then the paper's architecture learning rate scaled by the paper's architecture steps over the run's)."""
import json

import numpy as np
import pytest
import torch

from conftest import interrupt_search_at
from ktnas.engine.algorithms import get_algorithm
from ktnas.engine.search.loop import SearchConfig, resolve_config, search
from ktnas.engine.search.schedule import paper_arch_steps, plan
from ktnas.engine.search.supernet import Supernet


def planned(steps_per_epoch, **kw):
    c = resolve_config(SearchConfig(features="x", **kw))
    return plan(c, get_algorithm(c.algo), steps_per_epoch)


def test_the_papers_architecture_steps():
    # DARTS: 50 epochs x 391 batches of 64 (25,000 images); PC-DARTS: 35 of its 50 epochs x 98 batches of 256;
    # GDAS: 250 epochs x 391
    assert [paper_arch_steps(get_algorithm(a)) for a in ("darts", "pcdarts", "gdas", "darts-pt")] == \
        [19_550, 3_430, 97_750, 19_550]


def test_auto_takes_the_short_schedule_far_below_the_papers_steps():
    c, rec = planned(391)  # DARTS' own budget: the paper's schedule, untouched
    assert rec["used"] == "paper" and c.arch_lr == 3e-4 and c.options["warmup"] == 0
    c, rec = planned(32, epochs=8)  # 8 epochs of 32 steps: 2 of warm-up, 192 architecture steps
    assert rec["used"] == "short" and c.options["warmup"] == 2 and rec["arch_steps"] == 192
    assert c.arch_lr == pytest.approx(3e-4 * 19_550 / 192) and rec["arch_lr"] == c.arch_lr
    c, rec = planned(391, epochs=5)  # 1,955 steps: exactly a tenth, not below it
    assert rec["used"] == "paper" and c.arch_lr == 3e-4
    c, rec = planned(391, epochs=5, schedule="short")  # asked for: taken whatever the budget
    assert rec["used"] == "short" and c.options["warmup"] == 1 and c.arch_lr == pytest.approx(3e-4 * 19_550 / 1_564)
    c, rec = planned(32, epochs=8, schedule="paper")
    assert rec["used"] == "paper" and c.arch_lr == 3e-4 and c.options["warmup"] == 0
    c, rec = planned(4, epochs=8)  # 24 architecture steps: the paper's movement would take 0.24 a step
    assert c.arch_lr == 0.1 and rec["arch_steps"] == 24


def test_short_schedule_keeps_a_given_rate_and_a_longer_warmup():
    c, rec = planned(32, epochs=8, arch_lr=0.01, options=dict(warmup=3))
    assert rec["used"] == "short" and rec["arch_lr_given"] and c.arch_lr == 0.01 and c.options["warmup"] == 3
    c, rec = planned(10, epochs=10, algo="pcdarts")  # PC-DARTS' own 30% warm-up is longer than a quarter
    assert c.options["warmup"] == 3 and c.arch_lr == pytest.approx(6e-4 * 3_430 / 70)
    c, rec = planned(100, epochs=8, algo="gdas")  # GDAS gets the warm-up too (its option, 0 in the paper)
    assert c.options["warmup"] == 2 and c.arch_lr == pytest.approx(3e-4 * 97_750 / 600)
    c, rec = planned(10, epochs=8, algo="random", options=dict(candidates=4))
    assert rec["used"] == "paper" and "no architecture optimiser" in rec["why"]


def test_a_search_states_its_schedule(search_store, tmp_path, capsys):
    """config.json records the schedule used and why; the log says it in one line."""
    from ktnas.engine.cli import main

    common = ["--features", search_store, "--epochs", 4, "--batch-size", 8, "--layers", 2, "--channels", 4,
              "--reductions", 1, "--limit", 48, "--device", "cpu", "--quiet"]
    assert main(["search", *map(str, common), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    used = json.loads((tmp_path / "a" / "config.json").read_text())["schedule_used"]
    # 24 search-train samples in batches of 8: 3 steps per epoch, the first of 4 epochs a warm-up
    assert used["used"] == "short" and used["warmup_epochs"] == 1 and used["arch_steps"] == 9
    assert "ktnas search: short-budget schedule (9 architecture steps, under 10% of the paper's 19,550): the " \
           "weights alone for 1 epoch(s), then the alphas at Adam lr 0.1 (the paper's x its architecture steps / " \
           "this run's, 19,550/9, at most 0.1)" in err
    assert main(["search", *map(str, common), "--out", str(tmp_path / "p"), "--schedule", "paper"]) == 0
    assert "ktnas search: the paper's schedule (--schedule paper)" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["arch_lr"] == 3e-4 and cfg["options"]["warmup"] == 0 and cfg["schedule_used"]["used"] == "paper"


def test_gdas_warmup_leaves_the_alphas_as_initialised(search_store, tmp_path):
    search(SearchConfig(features=search_store, out=str(tmp_path / "run"), algo="gdas", epochs=1, batch_size=16,
                        layers=2, channels=4, reductions=(1,), limit=48, progress=False, options=dict(warmup=1)))
    with np.load(tmp_path / "run" / "alphas.npz") as z:
        a = z["normal_e000"]
    torch.manual_seed(0)
    m = Supernet("darts", 10, 16, layers=2, channels=4, reductions=(1,))
    np.testing.assert_array_equal(a, m.alpha_normal.detach().numpy())


@pytest.mark.parametrize("algo", ["darts", "gdas"])
def test_short_schedule_search_is_reproducible_and_resumes_bit_exactly(search_store, tmp_path, monkeypatch, algo):
    """The default at a small budget (short: a warm-up epoch, then the scaled rate), killed in its third epoch and
    resumed, equals the uninterrupted search, which equals a second uninterrupted one."""
    def run(out, **kw):
        return search(SearchConfig(features=search_store, out=str(tmp_path / out), epochs=4, batch_size=16, layers=2,
                                   channels=4, reductions=(1,), limit=48, progress=False, algo=algo, **kw))

    run("full")
    run("again")
    undo = interrupt_search_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run("cut")
    undo()
    run("cut", resume=True)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["schedule_used"]["used"] == "short"
    for other in ("again", "cut"):
        with np.load(tmp_path / "full" / "alphas.npz") as a, np.load(tmp_path / other / "alphas.npz") as b:
            assert a.files == b.files and len(a.files) == 8
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k])
        assert (tmp_path / "full" / "genotype.json").read_text() == (tmp_path / other / "genotype.json").read_text()
    torch.manual_seed(0)
    init = Supernet("darts", 10, 16, layers=2, channels=4, reductions=(1,)).alpha_normal.detach().numpy()
    with np.load(tmp_path / "full" / "alphas.npz") as a:  # the warm-up epoch left them; the next ones moved them
        np.testing.assert_array_equal(a["normal_e000"], init)
        assert np.abs(a["normal_e003"] - init).max() > 0.3  # about the scaled rate (at most 0.1) per step


def test_a_run_from_before_the_schedule_resumes_with_the_papers_rates(search_store, tmp_path, monkeypatch):
    """A checkpoint whose configuration has no schedule (written before --schedule existed, at the papers' rates)
    resumes under the default as it was run, and ends as the uninterrupted paper-schedule search."""
    def run(out, **kw):
        return search(SearchConfig(features=search_store, out=str(tmp_path / out), epochs=2, batch_size=16, layers=2,
                                   channels=4, reductions=(1,), limit=48, progress=False, **kw))

    run("full", schedule="paper")
    undo = interrupt_search_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run("old", schedule="paper")
    undo()
    ckpt = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["schedule"]
    torch.save(state, ckpt)
    run("old", resume=True)  # the default, auto, would have taken the short schedule here
    assert (tmp_path / "full" / "genotype.json").read_text() == (tmp_path / "old" / "genotype.json").read_text()
    assert json.loads((tmp_path / "old" / "config.json").read_text())["schedule_used"]["used"] == "paper"
