"""Classes travel with the model: ``ktnas evaluate`` maps an image folder's class folders onto the
model's classes by name (exact, then loosely), or by index for folders 0..N-1; a folder naming no class of the
model, or another data set, is refused in one line listing both; per-class accuracy and a confusion matrix.
Real data: Fashion-MNIST test images written as PNG files."""

import json
import os
import warnings

import numpy as np
import pytest

from conftest import ktnas, one_line_error

from ktnas.cache.classes import class_mapping, relabel
from ktnas.cache.datasets import load_split

FMNIST = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="dataset-fashion-mnist not installed")
N = 200  # test images written into the folders


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small model trained on 300 cached Fashion-MNIST images (ImageNet MobileNetV2 stem)."""
    from ktnas.cache.errors import KtnasError
    from ktnas.cache.precompute import precompute
    from ktnas.engine.train.loop import TrainConfig, train

    d = tmp_path_factory.mktemp("classes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            precompute(dataset="fashion-mnist", limit=300, out=str(d / "f.zarr"), progress=False)
    except KtnasError as e:
        if "ImageNet weights" in str(e):
            pytest.skip(str(e))
        raise
    genotype = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|skip_connect~2|"
    train(TrainConfig(features=str(d / "f.zarr"), genotype=genotype, out=str(d / "run"), layers=3, channels=16,
                      epochs=8, batch_size=32, lr=0.05, drop_path=0.0, progress=False, device="cpu"))
    return d / "run" / "model.pt"


def _folder(root, names):
    """The first N Fashion-MNIST test images as PNG files in test/<names[label]>/ (and an empty train/)."""
    from PIL import Image

    split = load_split("fashion-mnist", "test")
    for i in range(N):
        label = int(split.labels[i])
        d = root / "test" / names[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.get_batch([i])[0, 0].numpy()).save(d / f"{i:05d}.png")
    return f"imagefolder:{root}"


def _evaluate(model, dataset, *extra):
    r = ktnas("evaluate", "--model", model, "--dataset", dataset, "--split", "test", "--limit", N, "--device",
              "cpu", "--json", "--quiet", *extra)
    return json.loads(r.stdout)


def test_class_name_and_digit_folders_score_as_the_data_set(model, tmp_path):
    classes = load_split("fashion-mnist", "test").classes
    ref = _evaluate(model, "fashion-mnist")
    # folders named as people name them ('/' cannot be in a folder name: T-shirt_top), in alphabetical order
    # unlike the classes; loose names (case, '-' for '/' and spaces); folders 0..9 in the classes' order
    by_name = _evaluate(model, _folder(tmp_path / "names", [c.replace("/", "_") for c in classes]), "--out",
                        tmp_path / "eval")
    loose = _evaluate(model, _folder(tmp_path / "loose", [c.lower().replace("/", "-").replace(" ", "-")
                                                         for c in classes]))
    digits = _evaluate(model, _folder(tmp_path / "digits", [str(k) for k in range(10)]))
    assert ref["n"] == by_name["n"] == digits["n"] == N
    truth = load_split("fashion-mnist", "test").labels[:N].numpy()
    for name, r in (("names", by_name), ("loose", loose), ("digits", digits)):
        # the folders' labels mapped onto the model's are the true labels, image by image (files in order)
        folder = relabel(load_split(f"imagefolder:{tmp_path / name}", "test", image_size=64), classes, "m")
        order = np.argsort([int(os.path.basename(p)[:5]) for p in folder._paths])
        assert (folder.labels.numpy()[order] == truth).all(), name
        # the same images: the same accuracy (PNG files are resized by another path: within 2 images)
        assert abs(r["correct"] - ref["correct"]) <= 2, (name, r["accuracy"], ref["accuracy"])
        assert r["classes"] == classes
    assert ref["accuracy"] > 40  # far above chance: a wrong mapping would show
    conf = np.array(by_name["confusion"])
    assert conf.sum() == N and np.trace(conf) == by_name["correct"]
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 2000
    assert set(by_name["per_class_accuracy"]) <= set(classes)


def test_unknown_classes_and_other_data_sets_are_refused(model, tmp_path):
    classes = load_split("fashion-mnist", "test").classes
    names = [c.replace("/", "_") for c in classes]
    names[3] = "Airplane"
    r = ktnas("evaluate", "--model", model, "--dataset", _folder(tmp_path / "bad", names), "--device", "cpu",
              check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "'Airplane' name none of the model's" in r.stderr and "Ankle boot" in r.stderr
    r = ktnas("evaluate", "--model", model, "--dataset", "synthetic", "--device", "cpu", check=False)
    assert r.returncode == 2 and "'class0'" in r.stderr and "T-shirt/top" in r.stderr


def test_class_mapping_rules():
    want = ["T-shirt/top", "Trouser", "Ankle boot"]
    assert class_mapping(sorted(want), want, "f", "m") == [2, 0, 1]
    assert class_mapping(["ankle_boot", "t shirt top"], want, "f", "m") == [2, 0]
    assert class_mapping(["0", "2"], want, "f", "m") == [0, 2]
    one_line_error(lambda: class_mapping(["3"], want, "f", "m"), "'3' name none of m's")
    one_line_error(lambda: class_mapping(["Trouser", "trouser"], want, "f", "m"), "two classes map to one")


def test_predict_on_png_files(model, tmp_path):
    """ktnas predict on real PNG files (grayscale 28x28, an RGB copy at 50x40, a folder): class names and
    probabilities; the top class is evaluate's prediction (the model's argmax on the same image)."""
    from PIL import Image

    from ktnas.engine.train.network import load_model

    split = load_split("fashion-mnist", "test")
    classes = split.classes
    for i in range(4):
        Image.fromarray(split.get_batch([i])[0, 0].numpy()).save(tmp_path / f"g{i}.png")
    Image.fromarray(split.get_batch([0])[0, 0].numpy()).convert("RGB").resize((50, 40)).save(tmp_path / "rgb.jpg")
    r = ktnas("predict", "--model", model, tmp_path / "g0.png", tmp_path, "--top", "3", "--json", "--device", "cpu")
    rows = json.loads(r.stdout)
    assert len(rows) == 1 + 5 and all(len(x["top"]) == 3 for x in rows)
    net = load_model(model).eval()
    for x in rows[:1] + [x for x in rows[1:] if x["path"].endswith(".png")]:
        i = int(os.path.basename(x["path"])[1])
        want = int(net(split.get_batch([i])).argmax(1))
        assert x["top"][0]["class"] == classes[want] and x["top"][0]["index"] == want
        ps = [t["probability"] for t in x["top"]]
        assert ps == sorted(ps, reverse=True) and 0 < sum(ps) <= 1 + 1e-6
    assert any(x["path"].endswith("rgb.jpg") for x in rows)
    text = ktnas("predict", "--model", model, tmp_path / "g1.png", "--device", "cpu").stdout
    assert text.startswith(str(tmp_path / "g1.png") + ": ") and "%" in text
    bad = ktnas("predict", "--model", model, tmp_path / "nothing.png", check=False)
    assert bad.returncode == 2 and "no such image file" in bad.stderr


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_runs_on_raw_images_as_the_model(model, tmp_path, fmt):
    """ktnas export: the model as one ONNX (checked in onnxruntime) or TorchScript file on raw uint8 images,
    any batch size: the PyTorch model's logits within 1e-4 and the same accuracy on real test images."""
    import torch

    from ktnas.engine.train.network import load_model

    out = tmp_path / f"m.{fmt}"
    threads = ["--threads", "1"] if fmt == "onnx" else []  # as bench latency measures its tables
    r = ktnas("export", "--model", model, "--format", fmt, "--out", out, *threads)
    assert "uint8 images [N, 1, 28, 28] -> logits [N, 10]" in r.stdout and out.stat().st_size > 10_000
    runtime = {"onnx": "onnxruntime", "torchscript": "torchscript"}[fmt]
    assert "M multiply-adds per image (frozen stem" in r.stdout  # the cost, then the latency on its runtime
    where = "cpu, 1 thread" if threads else "cpu"
    assert f"latency on {runtime} ({where}): batch 1: " in r.stdout and "batch 32: " in r.stdout
    split = load_split("fashion-mnist", "test")
    net = load_model(model).eval()
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda x: sess.run(None, {"images": x.numpy()})[0]  # the three lines of docs/guides/train.md
    else:
        ts = torch.jit.load(str(out))
        run = lambda x: ts(x).numpy()
    correct = {"export": 0, "torch": 0}
    for a, b in ((0, 50), (50, 57)):  # batches of 50 and 7
        x, y = split.get_batch(slice(a, b)), split.labels[a:b].numpy()
        got = run(x)
        with torch.no_grad():
            ref = net(x).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
        correct["export"] += int((got.argmax(1) == y).sum())
        correct["torch"] += int((ref.argmax(1) == y).sum())
    assert correct["export"] == correct["torch"] > 57 * 0.4


def test_evaluate_reports_the_models_cost_and_latency(model):
    """evaluate --json: the exported model's weights (stem + network, every parameter of the loaded model) and
    multiply-adds (the stem's share apart, counted on one image), and its PyTorch latency at batch 1 and 32."""
    import torch

    from ktnas.engine.profile.cost import count
    from ktnas.engine.train.network import load_model

    r = _evaluate(model, "fashion-mnist")
    net = load_model(model)
    assert r["cost"]["params"] == sum(p.numel() for p in net.parameters())
    assert r["cost"]["stem_params"] == sum(p.numel() for p in net.stem.parameters()) > 0
    image = torch.zeros(1, 3, 64, 64)
    stem_macs = count(net.stem, image)[1]
    assert r["cost"]["stem_macs"] == stem_macs > 0
    assert r["cost"]["macs"] == stem_macs + count(net.net, net.stem(image))[1]
    assert sorted(r["latency_ms"]) == ["1", "32"] and r["latency_device"] == "cpu"
