"""--max-memory: the batch picked from the step profile's per-sample bytes, on any device (CUDA: confirmed by trial
steps, whose binary search is checked here with a faked trial). The profile is linear in the batch to the byte."""

import argparse
import json

import pytest
import torch

from ktnas.cache.errors import KtnasError
from ktnas.engine.search import memory as M
from ktnas.engine.search.loop import SearchConfig, add_search_parser, resolve_config, search

pytestmark = pytest.mark.usefixtures("one_thread")
INFO = dict(in_channels=24, resolution=8, shape=[24, 8, 8], num_classes=10)


def _cfg(**kw):
    """A one-cell supernet (a reduction cell: both strides, every op), a profile in half the time of two."""
    return resolve_config(SearchConfig(features="x", device="cpu", layers=1, channels=4, reductions=(0,),
                                       batch_size=64, **kw))


@pytest.mark.parametrize("algo,order,fractions", [("darts", 1, (0.1, 0.55)), ("darts", 2, (0.3,)),
                                                  ("gdas", 1, (0.1, 0.55))])
def test_profile_picks_the_largest_batch_that_fits(algo, order, fractions):
    """For budgets between the profiled peaks of batches 1 and 64, the pick fits by the profile and the next
    batch does not (GDAS' one-op step is convex but not linear in the batch: the peak's moment moves)."""
    cfg = _cfg(algo=algo, options=dict(order=order) if algo == "darts" else {})
    peaks = {b: M.profile_peak(cfg, INFO, b) for b in (1, 64)}
    assert peaks[64] > 4 * peaks[1]  # activations dominate at batch 64
    for budget in (peaks[1] + (peaks[64] - peaks[1]) * f for f in fractions):
        pick = M.profile_batch_size(cfg, INFO, int(budget))
        assert pick.peak == M.profile_peak(cfg, INFO, pick.batch) <= budget
        assert M.profile_peak(cfg, INFO, pick.batch + 1) > budget, (pick, budget)
        assert pick.profiles <= 2 + M.REFINE and pick.per_sample > 0
    if order == 1:
        assert M.profile_batch_size(cfg, INFO, peaks[64]).batch == 64
        assert M.profile_batch_size(cfg, INFO, peaks[1] - 1).batch == 0


def test_max_memory_on_the_cpu_picks_from_the_profile(search_store, tmp_path, capsys):
    """A search on the CPU with --max-memory runs at the largest batch whose profiled peak fits: the next batch
    would not; config.json records the choice."""
    base = dict(features=str(search_store), epochs=1, batch_size=32, limit=64, layers=1, channels=4,
                reductions=(0,), device="cpu", progress=False)  # one reduction cell: a profile in half the time
    cfg = resolve_config(SearchConfig(**base))
    info = dict(in_channels=16, resolution=16, shape=[16, 16, 16], num_classes=10)  # the store's features
    cap = (M.profile_peak(cfg, info, 11) + M.profile_peak(cfg, info, 12)) // 2
    search(SearchConfig(out=str(tmp_path / "run"), max_memory=str(cap), **base))
    got = json.loads((tmp_path / "run" / "config.json").read_text())
    assert got["data"]["num_classes"] == 10 and got["data"]["shape"] == info["shape"]
    assert got["batch_size_chosen"] == 11 == got["batch_size"]
    assert "batch size 11 per rank (largest fitting" in capsys.readouterr().err


def test_max_memory_refuses_when_not_even_one_sample_fits(search_store, tmp_path):
    p = argparse.ArgumentParser()
    add_search_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["search", "--features", str(search_store), "--out", str(tmp_path / "run"), "--device",
                         "cpu", "--max-memory", "64KiB", "--layers", "1", "--channels", "4", "--reductions", "0",
                         "--quiet"])
    with pytest.raises(KtnasError, match=r"--max-memory 64\.0 KiB: even batch size 1 needs .* by the step profile") \
            as e:
        args.func(args)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("budget, oom_above, want", [(5_000, None, 40), (3_050, None, 20), (10**9, 33, 33),
                                                      (10**9, None, 64)])
def test_cuda_trials_search_below_the_profile_choice(monkeypatch, budget, oom_above, want):
    """On CUDA the profile's choice is confirmed by a trial step, and a binary search of trials below it takes
    over when the device needs more (the trial itself needs CUDA: faked here)."""
    tried = []

    def fake_peak(cfg, device, info, b):
        tried.append(b)
        return None if oom_above is not None and b > oom_above else 1_000 + 100 * b

    monkeypatch.setattr(M, "trial_peak", fake_peak)
    monkeypatch.setattr(M.torch.cuda, "empty_cache", lambda: None)
    assert M._confirm_on_cuda(SearchConfig(max_memory=budget), torch.device("cpu"), {}, 64) == want
    assert len(tried) <= 8 and tried[0] == 64  # the profile's choice first, then a binary search


def test_max_memory_with_compiled_capture(search_store, tmp_path):
    """--max-memory and --capture compile together: the batch picked by the profile, the step compiled."""
    base = dict(features=str(search_store), epochs=1, batch_size=32, limit=64, layers=1, channels=4,
                reductions=(0,), device="cpu", progress=False, algo="gdas", capture="compile",
                compile_backend="aot_eager")
    s = search(SearchConfig(out=str(tmp_path / "run"), max_memory="64MiB", **base))
    got = json.loads((tmp_path / "run" / "config.json").read_text())
    assert got["capture_used"] == "compile" and 1 <= got["batch_size_chosen"] <= 32 and s["last"]["train_loss"] > 0
