"""ktnas bench search: every configuration really runs (or is skipped with its reason) at tiny sizes on the CPU;
rows, ratios, the network each configuration trains, refusals. No timing is asserted (it depends on the machine)."""
import json
import math
import warnings

import numpy as np
import pytest
import torch

from ktnas.bench import search as BS
from ktnas.bench.search import CONFIGS, _CASES, bench_search
from ktnas.bench.search_data import classic_images
from ktnas.cache.errors import KtnasError
from ktnas.engine.cli import main
from ktnas.engine.layout import resolve_layout
from ktnas.engine.spaces import get_space
from ktnas.engine.search.supernet import Supernet, count_parameters

# synthetic 32 px images through a small random stem: 16x16x16 features, like the default stem's 24x16x16
TINY = ["--dataset", "synthetic", "--weights", "none", "--stem", "mobilenet_v2:features.1", "--image-size", "32",
        "--device", "cpu", "--threads", "1"]
REQUIRED = ("config", "space", "algo", "batch", "device", "step_ms", "samples_per_s", "peak_mem_bytes")
MEASURED = ("baseline", "images"), ("stem-on-the-fly", "images"), ("cached", "disk"), ("cached", "memory")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: intra-op threads only add overhead


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One CLI run, DARTS first order on the DARTS space, every configuration, batch 2, 2 timed steps each."""
    out = tmp_path_factory.mktemp("bench") / "search"
    assert main(["bench", "search", *TINY, "--algos", "darts-1", "--spaces", "darts", "--batch-size", "2",
                 "--warmup", "0", "--steps", "2", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A store of 8x8 features (16 px synthetic images through the random stem): a two-cell supernet, cheap to
    compile."""
    from ktnas.cache.precompute import precompute

    out = tmp_path_factory.mktemp("small-store") / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random stem weights
        precompute(dataset="synthetic", stem="mobilenet_v2:features.1", weights="none", image_size=16, out=str(out),
                   limit=64, progress=False)
    return out


def measured(rows):
    return [r for r in rows if r["skipped"] is None]


def check_step_ran(r, batch):
    """A measured row: positive finite numbers, samples/s = batch / median step, weights and alphas trained."""
    for k in ("step_ms", "samples_per_s", "peak_mem_bytes", "loss"):
        assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r[k])
    assert r["step_ms"] > 0 and r["peak_mem_bytes"] > 0 and r["mem_increase_bytes"] >= 0
    assert r["peak_mem_bytes"] >= r["mem_increase_bytes"]
    assert len(r["step_ms_all"]) == r["steps"]
    assert r["step_ms"] == pytest.approx(float(np.median(r["step_ms_all"])))
    assert r["samples_per_s"] == pytest.approx(batch / (r["step_ms"] / 1e3))
    assert r["params_changed"] and r["arch_changed"], r["config"]


def test_every_configuration_has_a_row(cpu_run, capsys):
    out, data = cpu_run
    rows = data["rows"]
    assert [(r["config"], r["source"]) for r in rows] == [*MEASURED, ("cached-fused", "disk"),
                                                          ("cached-fused-graph", "disk")]
    assert {r["config"] for r in rows} == set(CONFIGS) - {"cached-compiled"}  # compiled: on request
    for r in rows:
        assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
        assert (r["space"], r["variant"], r["algo"], r["options"], r["batch"], r["device"]) == \
            ("darts", "darts-1", "darts", {}, 2, "cpu")
    for r in measured(rows):
        check_step_ran(r, 2)
    assert [(r["config"], r["source"]) for r in measured(rows)] == list(MEASURED)
    # the CUDA-only configurations are skipped here, and say why
    skipped = {r["config"]: r["skipped"] for r in rows if r["skipped"] is not None}
    assert set(skipped) == {"cached-fused", "cached-fused-graph"}
    assert all(reason.startswith("needs CUDA") for reason in skipped.values())
    assert all(r["step_ms"] is None and r["samples_per_s"] is None for r in rows if r["skipped"])
    md = (out / "results.md").read_text()
    assert data["command"] in md and md.count("\n|") == len(rows) + 2
    assert md.count("skipped: needs CUDA") == 2
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the store it built stays in --out for a rerun (beside precompute's lock file)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == \
        {"results.json", "results.md", "results.png", "features.zarr"}
    assert data["command"].startswith("ktnas bench search ") and "--algos darts-1" in data["command"]


def test_same_network_after_the_stem(cpu_run):
    """The KT-NAS configurations train one network (only the input differs); the baseline is the classic one,
    whose first cells (above the stem's 16x16) the stem replaces."""
    rows = {(r["config"], r["source"]): r for r in cpu_run[1]["rows"]}
    kt = [rows[k] for k in MEASURED[1:]]
    keys = ("params", "arch_params", "cells", "channels", "reductions", "input_shape")
    assert all(all(r[k] == kt[0][k] for k in keys) for r in kt)
    layers, channels, reductions = resolve_layout(get_space("darts"), 16).as_dict().values()
    assert (kt[0]["cells"], kt[0]["channels"], kt[0]["reductions"]) == (layers, channels, list(reductions))
    assert kt[0]["input_shape"] == [16, 16, 16]
    base = rows[("baseline", "images")]
    layers, channels, reductions = resolve_layout(get_space("darts"), None).as_dict().values()
    assert (base["cells"], base["channels"], base["reductions"], base["input_shape"]) == \
        (layers, channels, list(reductions), [3, 32, 32])
    assert base["params"] == 1_930_618  # DARTS' own count for 10 classes
    assert kt[0]["cells"] == base["cells"] - (base["reductions"][0] + 1)  # the cells at 32x32 and their reduction
    torch.manual_seed(0)
    assert kt[0]["params"] == count_parameters(Supernet("darts", 10, 16, stem="cached", layers=layers - 3,
                                                        channels=32, reductions=(2,)))


def test_ratios(cpu_run):
    rows = cpu_run[1]["rows"]
    base = rows[0]
    assert base["config"] == "baseline" and base["speedup"] == 1.0 and base["mem_ratio"] == 1.0
    for r in measured(rows):
        assert r["speedup"] == pytest.approx(r["samples_per_s"] / base["samples_per_s"])
        # on the CPU the memory ratio compares the RSS increases (the runtime's RSS is common to all rows)
        assert r["mem_ratio"] == pytest.approx(r["mem_increase_bytes"] / base["mem_increase_bytes"])
    disk, mem = rows[2], rows[3]
    assert disk["stream_overhead"] == pytest.approx(disk["step_ms"] / mem["step_ms"] - 1)
    assert all(r["stream_overhead"] is None for r in rows if r is not disk)
    assert all(r["speedup"] is None and r["mem_ratio"] is None for r in rows if r["skipped"])


def test_algorithms_on_nb201_reuse_a_given_store(cpu_run, tmp_path):
    """Second order, PC-DARTS and GDAS steps run (on NAS-Bench-201's space), from the store of the first run."""
    store = cpu_run[0] / "features.zarr"
    before = sorted(p.name for p in store.rglob("*"))
    notes = []
    rows = bench_search(store, device="cpu", algos="darts-2,pcdarts,gdas", spaces="nb201",
                        configs="cached,cached-memory,cached-fused-graph", batch_size=2, warmup=0, steps=1,
                        work_dir=tmp_path, notes=notes)
    assert [(r["algo"], r["options"], r["config"], r["source"]) for r in rows] == [
        (a, o, c, s) for a, o in (("darts", {"order": 2}), ("pcdarts", {}), ("gdas", {}))
        for c, s in (("cached", "disk"), ("cached", "memory"), ("cached-fused-graph", "disk"))]
    for r in measured(rows):
        assert r["space"] == "nb201"
        check_step_ran(r, 2)
    assert len(measured(rows)) == 6
    assert sorted(p.name for p in store.rglob("*")) == before and not (tmp_path / "features.zarr").exists()
    assert any(str(store) in n for n in notes)


@pytest.mark.parametrize("algo", ["darts-1", "gdas"])
def test_compiled_row_is_search_compiled(small_store, tmp_path, algo):
    """cached-compiled runs ktnas search's --capture compile step (aot_eager here): the same freshly seeded
    network on the same batches as the cached row, so the same last loss; the rows record recompute and capture."""
    rows = bench_search(small_store, device="cpu", algos=algo, spaces="darts",
                        configs="cached,cached-compiled", batch_size=2, warmup=1, steps=2, work_dir=tmp_path,
                        recompute="none", compile_backend="aot_eager")
    plain, comp = rows
    assert (plain["config"], comp["config"]) == ("cached", "cached-compiled")
    check_step_ran(comp, 2)
    assert (plain["capture"], comp["capture"], plain["recompute"], comp["recompute"]) == ("none", "compile",
                                                                                      "none", "none")
    assert comp["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_fused_kernels_refusing_a_variant_skip_the_row(cpu_run, tmp_path, monkeypatch):
    """A KtnasError of the fused kernels (a variant they do not cover yet) makes a skipped row with its message;
    the same error from the reference path is not swallowed."""
    import ktnas.engine.search.supernet as SN

    real = SN.mixed_op
    msg = "the fused Triton kernels cover the full mixed op so far, not variant 'pc': use --kernels torch"

    def mixed_op(*a, impl="auto", **k):
        if impl == "triton":
            raise KtnasError(msg)
        return real(*a, impl=impl, **k)

    monkeypatch.setattr(SN, "mixed_op", mixed_op)
    monkeypatch.setattr(BS, "_cuda_reason", lambda case, algo, device: None)  # as if on CUDA
    store = cpu_run[0] / "features.zarr"
    rows = bench_search(store, device="cpu", algos="pcdarts", spaces="nb201", configs="cached,cached-fused",
                        batch_size=2, warmup=0, steps=1, work_dir=tmp_path)
    assert rows[0]["config"] == "cached" and rows[0]["skipped"] is None
    assert rows[1]["config"] == "cached-fused" and rows[1]["skipped"] == msg and rows[1]["step_ms"] is None

    def broken(*a, **k):
        raise KtnasError("reference refused")

    monkeypatch.setattr(SN, "mixed_op", broken)
    with pytest.raises(KtnasError, match="reference refused"):
        bench_search(store, device="cpu", algos="darts-1", spaces="nb201", configs="cached", batch_size=2, warmup=0,
                     steps=1, work_dir=tmp_path)


def test_reasons_for_cuda_only_configurations():
    cpu = torch.device("cpu")
    assert BS._cuda_reason(_CASES["cached-fused"], "darts", cpu) == BS.NEEDS_CUDA_FUSED
    assert BS._cuda_reason(_CASES["cached-fused-graph"], "darts", cpu) == BS.NEEDS_CUDA_GRAPH
    for name in ("baseline", "stem-on-the-fly", "cached", "cached-memory"):
        assert BS._cuda_reason(_CASES[name], "gdas", cpu) is None


def test_the_store_stem_is_rebuilt_from_its_attributes(tmp_path):
    """stem-on-the-fly runs the stem that made the store: its recorded weights source (imagenet (...), none,
    file:PATH) is mapped back to a --weights value; what cannot be rebuilt skips the row with the reason."""
    from ktnas.cache.stems import get_stem

    made = [get_stem("mobilenet_v2:features.1", "none", 32)]
    torch.save({k: v + 1 for k, v in made[0].body.state_dict().items()}, tmp_path / "w.pt")
    made.append(get_stem("mobilenet_v2:features.1", str(tmp_path / "w.pt"), 32))
    try:
        made.append(get_stem("mobilenet_v2:features.1", "imagenet", 32))
    except KtnasError:  # no offline copy of the ImageNet weights here: the other two sources still count
        pass
    for stem in made:
        attrs = stem.describe()
        assert BS._store_stem(attrs).fingerprint == stem.fingerprint, attrs["weights"]
    assert made[1].describe()["weights"].startswith("file:")
    with pytest.raises(BS._Skip, match="cannot be rebuilt here"):
        BS._store_stem(dict(made[1].describe(), weights=f"file:{tmp_path / 'gone.pt'}"))


def test_classic_images():
    g = torch.Generator().manual_seed(0)
    fm = torch.randint(1, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=g)
    x = classic_images(fm)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)
    raw = fm.float() / 255
    # zero padding (2 px each side, the pixel value 0 before normalisation), the image itself in the centre
    border = x[:, 0, :2, :]
    assert torch.allclose(border, border.flatten()[0].expand_as(border))
    centre = x[:, 0, 2:30, 2:30]
    scale = (centre.flatten() - border.flatten()[0]) / raw.flatten()
    torch.testing.assert_close(scale, scale[0].expand_as(scale), rtol=1e-4, atol=1e-4)
    assert classic_images(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)).shape == (2, 3, 32, 32)
    assert classic_images(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("kw, match", [
    (dict(algos="darts-3"), "unknown 'darts-3' in --algos"),
    (dict(spaces="nasbench"), "unknown 'nasbench' in --spaces"),
    (dict(configs="cached,fast"), "unknown 'fast' in --configs"),
    (dict(configs=" , "), "nothing in --configs"),
    (dict(steps=0), "--steps must be an integer >= 1"),
    (dict(warmup=-1), "--warmup must be an integer >= 0"),
    (dict(batch_size=0), "--batch-size must be an integer >= 1"),
    (dict(precision="fp16"), "unknown --precision"),
    (dict(memory_cap="2GiB"), "--memory-cap limits CUDA memory"),
    (dict(memory_cap="lots", device="cuda"), "bad size|no CUDA device"),
    (dict(batch_size=64), "fewer than batch 64"),
])
def test_bad_input_one_line(cpu_run, tmp_path, kw, match):
    kw = dict(dict(device="cpu", work_dir=tmp_path, batch_size=2, steps=1, warmup=0), **kw)
    with pytest.raises(KtnasError, match=match) as e:
        bench_search(cpu_run[0] / "features.zarr", **kw)
    assert "\n" not in str(e.value)


def test_cli_refuses_a_missing_store(tmp_path, capsys):
    assert main(["bench", "search", "--features", str(tmp_path / "nope.zarr"), "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ktnas: error: no feature store at {tmp_path / 'nope.zarr'}: pass a store made by "
                   "precompute-features, or drop --features to build one"]
