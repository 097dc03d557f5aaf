"""engine.network and engine.train: evaluation networks, training on cached features, resume, export, evaluate."""
import argparse
import contextlib
import io
import json
import math
import os
import shutil
import warnings

import numpy as np
import pytest
from conftest import one_line_error
import torch

from ktnas.cache.datasets import load_split
from ktnas.cache.errors import KtnasError
from ktnas.cache.precompute import precompute
from ktnas.cache.store import open_store
from ktnas.engine.train.network import build_network, load_model
from ktnas.engine.spaces import DartsGenotype, NB201Genotype
from ktnas.engine.train.loop import TrainConfig, add_evaluate_parser, add_train_parser, train

DARTS_V2 = DartsGenotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5])
NB201 = NB201Genotype.from_string("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|"
                                  "skip_connect~2|")
SMALL = dict(layers=4, channels=4, epochs=2, batch_size=32, progress=False, device="cpu", drop_path=0.2)


def cli(*argv) -> str:
    """Run the train/evaluate subcommands as `ktnas` would (stdout returned)."""
    p = argparse.ArgumentParser(prog="ktnas")
    sub = p.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    args = p.parse_args([str(a) for a in argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny store (synthetic 300/100, 2 views, 16x16x16 features), both genotypes, and one trained DARTS run."""
    d = tmp_path_factory.mktemp("train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precompute(dataset="synthetic:300/100", stem="mobilenet_v2:features.1", weights="none", image_size=32,
                   out=str(d / "s.zarr"), progress=False, views=2)
    DARTS_V2.save(d / "darts.json")
    NB201.save(d / "nb201.json")
    summary = train(TrainConfig(features=str(d / "s.zarr"), genotype=str(d / "darts.json"), out=str(d / "run"),
                                auxiliary=True, **SMALL))
    return d, summary


@pytest.mark.parametrize("genotype", [DARTS_V2, NB201], ids=["darts", "nb201"])
@pytest.mark.parametrize("variant", ["images", "features16", "features8"])
def test_network_shapes(genotype, variant):
    torch.manual_seed(0)
    shape, kw = {"images": ((2, 3, 32, 32), {}), "features16": ((2, 24, 16, 16), dict(in_channels=24, in_size=16)),
                 "features8": ((2, 32, 8, 8), dict(in_channels=32, in_size=8))}[variant]
    aux = isinstance(genotype, DartsGenotype) and variant != "features8"
    layers = 5 if isinstance(genotype, DartsGenotype) else 1
    net = build_network(genotype, 7, layers=layers, channels=4, auxiliary=aux, **kw).train()
    net.drop_path_prob = 0.2
    logits, logits_aux = net(torch.randn(*shape))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert (logits_aux.shape == (2, 7)) if aux else logits_aux is None
    assert net.eval()(torch.randn(*shape))[1] is None


def test_default_layouts():
    """Cached 16x16 features: DARTS keeps cells 7-19 (one reduction, at 13); NB201 keeps the 16 and 8 px stages."""
    darts = build_network(DARTS_V2, 10, in_channels=24, in_size=16, auxiliary=True)
    assert len(darts.cells) == 13 and [c.reduction for c in darts.cells].index(True) == 6
    assert darts.layout[1].startswith("cell 7: normal C=72") and darts.aux_index == 6
    classic = build_network(DARTS_V2, 10)
    assert len(classic.cells) == 20 and 3.2e6 < sum(p.numel() for p in classic.parameters()) < 3.5e6
    nb = build_network(NB201, 10, in_channels=24, in_size=16)
    assert nb.layout == ["adapter 1x1 -> 32", "stage 1: 5 cells C=32", "resnet basic block /2 -> 64",
                         "stage 2: 5 cells C=64"]
    one_line_error(lambda: build_network(NB201, 10, auxiliary=True), "auxiliary")


def test_train_writes_run(work):
    d, s = work
    run = d / "run"
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "curves.png", "model.pt"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[1]["lr"] < rows[0]["lr"] and rows[1]["drop_path"] == pytest.approx(0.1)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lr"] == 0.025 and cfg["network_config"]["in_channels"] == 16 and cfg["layout"]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert s["model"] == str(run / "model.pt") and s["test_acc"] == rows[-1]["test_acc"]


def test_refuses_existing_run(work):
    d, _ = work
    one_line_error(lambda: train(TrainConfig(features=str(d / "s.zarr"), genotype=str(d / "darts.json"),
                                             out=str(d / "run"), **SMALL)), "--resume")


def test_resume_equals_uninterrupted(work, tmp_path):
    d, _ = work
    base = dict(features=str(d / "s.zarr"), genotype=str(d / "darts.json"), auxiliary=True, limit=96, **SMALL)
    full = train(TrainConfig(out=str(tmp_path / "a"), **base))
    half = train(TrainConfig(out=str(tmp_path / "b"), stop_after=1, **base))
    assert half["epochs_done"] == 1 and half["model"] is None
    rest = train(TrainConfig(out=str(tmp_path / "b"), resume=True, **base))
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    def strip(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert strip(full["history"]) == strip(rest["history"])
    one_line_error(lambda: train(TrainConfig(out=str(tmp_path / "b"), resume=True, **dict(base, epochs=3))),
                   "same --epochs")


def test_export_matches_cached_features(work):
    d, s = work
    model = load_model(d / "run" / "model.pt")
    test = load_split("synthetic:300/100", "test")
    with open_store(d / "s.zarr") as store:
        sp = store.split("test")
        feats = torch.from_numpy(np.concatenate([sp.read_chunk(i)[0][:, 0] for i in range(sp.num_chunks)])).float()
    with torch.no_grad():
        cached = model.net(feats)[0]
        live = model(test.images)
        as_float = model(test.images.float() / 255)
        resized = model(torch.nn.functional.interpolate(test.images[:4].float() / 255, size=48))
    # the cached features are float16: the raw-image path differs by their rounding only (~2e-5 relative here)
    assert (live - cached).abs().max() <= 1e-3 * cached.abs().max()
    assert torch.allclose(as_float, live, atol=1e-5) and resized.shape == (4, 10)
    cached_acc = 100 * float((cached.argmax(1) == test.labels).double().mean())  # float64, as the history
    assert cached_acc == pytest.approx(s["test_acc"], abs=1e-9)
    r = json.loads(cli("evaluate", "--model", d / "run" / "model.pt", "--dataset", "synthetic:300/100",
                       "--device", "cpu", "--json", "--quiet"))
    assert r["n"] == 100 and abs(r["accuracy"] - s["test_acc"]) <= 0.2


def test_load_model_refuses_bad_files(work, tmp_path):
    d, _ = work
    one_line_error(lambda: load_model(tmp_path / "missing.pt"), "no such model file")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    one_line_error(lambda: load_model(tmp_path / "garbage.pt"), "not a readable model file")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    one_line_error(lambda: load_model(tmp_path / "foreign.pt"), "not a ktnas model")
    payload = torch.load(d / "run" / "model.pt", weights_only=True)
    payload["stem"]["fingerprint"] = "0" * 64
    torch.save(payload, tmp_path / "tampered.pt")
    one_line_error(lambda: load_model(tmp_path / "tampered.pt"), "fingerprint")
    payload = torch.load(d / "run" / "model.pt", weights_only=True)
    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    torch.save(payload, tmp_path / "truncated.pt")
    one_line_error(lambda: load_model(tmp_path / "truncated.pt"), "damaged")


def test_on_the_fly(work, tmp_path):
    d, _ = work
    out = cli("train", "--features", d / "s.zarr", "--genotype", d / "nb201.json", "--out", tmp_path / "otf",
              "--on-the-fly", "--dataset", "synthetic:300/100", "--epochs", "1", "--layers", "3", "--channels", "8",
              "--batch-size", "50", "--device", "cpu", "--quiet")
    assert "1/1 epochs" in out and (tmp_path / "otf" / "model.pt").is_file()
    rows = [json.loads(line) for line in (tmp_path / "otf" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and math.isfinite(rows[0]["train_loss"])
    one_line_error(lambda: train(TrainConfig(features=str(d / "s.zarr"), genotype=str(d / "nb201.json"),
                                             out=str(tmp_path / "wrong"), on_the_fly=True, dataset="synthetic:200/100",
                                             epochs=1, progress=False, device="cpu")), "differ")
    bad = tmp_path / "bad.zarr"
    shutil.copytree(d / "s.zarr", bad)
    with open_store(bad, "a") as store:
        store.set_attrs(stem_fingerprint="0" * 64)
    one_line_error(lambda: train(TrainConfig(features=str(bad), genotype=str(d / "nb201.json"),
                                             out=str(tmp_path / "fp"), on_the_fly=True, epochs=1, progress=False,
                                             device="cpu")), "fingerprint")


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST files (dataset-fashion-mnist) not installed")
def test_fashion_mnist_above_chance(tmp_path):
    """Real data: ImageNet MobileNetV2 features.3 at 64 px, 300 train/300 test images, a small NB201 network."""
    store = tmp_path / "f.zarr"
    try:
        precompute(dataset="fashion-mnist", limit=300, out=str(store), progress=False)
    except KtnasError as e:
        if "ImageNet weights" in str(e):
            pytest.skip(str(e))
        raise
    NB201.save(tmp_path / "g.json")
    s = train(TrainConfig(features=str(store), genotype=str(tmp_path / "g.json"), out=str(tmp_path / "run"),
                          layers=3, channels=16, epochs=8, batch_size=32, lr=0.05, drop_path=0.0, progress=False,
                          device="cpu"))
    assert s["test_acc"] > 50, s["history"]
    r = json.loads(cli("evaluate", "--model", tmp_path / "run" / "model.pt", "--limit", "300", "--device", "cpu",
                       "--json", "--quiet"))
    assert r["dataset"] == "fashion-mnist" and abs(r["accuracy"] - s["test_acc"]) <= 0.2


@pytest.mark.parametrize("damage, message", [("corrupt", "is corrupt or truncated"), ("nan", "holds NaN/Inf features")])
def test_a_damaged_store_stops_training_with_one_line_and_nothing_else(work, tmp_path, damage, message):
    """`ktnas train` on a store with a damaged chunk, warnings on: stderr is the one error line naming the chunk
    (NaN features are not reported as a diverged training), no stray warning from the readers' threads."""
    from conftest import ktnas

    d, store = work[0], tmp_path / "s.zarr"
    shutil.copytree(d / "s.zarr", store)
    if damage == "corrupt":
        (store / "train" / "features" / "c" / "0" / "0" / "0" / "0" / "0").write_bytes(os.urandom(64))
    else:
        with open_store(store, "a") as st:
            sp = st.split("train")
            f, y = sp.read_chunk(0)
            f[3] = np.nan
            sp.write_chunk(0, f, y)
    r = ktnas("train", "--features", store, "--genotype", d / "nb201.json", "--out", tmp_path / "run",
              "--epochs", "1", "--layers", "2", "--channels", "4", "--device", "cpu", "--quiet", check=False,
              env={"PYTHONWARNINGS": "default"})
    assert r.returncode == 2
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("ktnas: error: chunk 0 of split "
                                                                                "'train'"), r.stderr
    assert message in r.stderr and "--verify --repair" in r.stderr
