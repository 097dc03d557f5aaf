"""Tests for ktnas.cache.datasets: loaders, IDX parsing, the synthetic set, image folders, errors."""

import gzip
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ktnas.cache import datasets as D
from ktnas.cache.errors import KtnasError

DEBIAN = D.DEBIAN_FASHION_MNIST_DIR
needs_debian = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEBIAN, "train-images-idx3-ubyte.gz")),
    reason="Debian's dataset-fashion-mnist is not installed")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No Debian folder, no default cache, KTNAS_DATA pointing at an empty dir."""
    empty = tmp_path / "empty_env"
    empty.mkdir()
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no_debian"))
    monkeypatch.setattr(D, "DEFAULT_DATA_DIR", str(tmp_path / "no_default"))
    monkeypatch.setenv("KTNAS_DATA", str(empty))
    return tmp_path


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def _write_idx(path, array: np.ndarray, gz: bool = True):
    data = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)


def _write_fashion(folder, n_train=12, n_test=5, gz=True, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, (img_stem, lbl_stem), n in (("train", D._FASHION_FILES["train"], n_train),
                                          ("test", D._FASHION_FILES["test"], n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        suffix = ".gz" if gz else ""
        _write_idx(folder / (img_stem + suffix), images, gz)
        _write_idx(folder / (lbl_stem + suffix), labels, gz)
        out[split] = (images, labels)
    return out


# ----------------------------------------------------------------------------- Fashion-MNIST

@needs_debian
def test_fashion_mnist_debian_files():
    train = D.load_split("fashion-mnist", "train")
    test = D.load_split("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(train) == 60000 and len(test) == 10000 and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and train.num_classes == 10 and len(train.classes) == 10
    assert torch.equal(torch.bincount(train.labels, minlength=10), torch.full((10,), 6000))
    assert int(test.labels.min()) >= 0 and int(test.labels.max()) <= 9
    assert D.load_split("fashion-mnist", "train") is train
    D._CACHE.clear()
    again = D.load_split("fashion-mnist", "train")
    assert again is not train and again.fingerprint == train.fingerprint
    assert train.fingerprint != test.fingerprint
    assert torch.equal(train.get_batch(slice(10, 20)), train.images[10:20])
    assert torch.equal(train.get_batch([5, 3, 59999]), train.images[[5, 3, 59999]])
    idx = torch.tensor([7, 0, 7])
    batch = train.get_batch(idx)
    assert torch.equal(batch, train.images[idx]) and batch.is_contiguous()
    assert torch.equal(train.get_batch(range(0, 9, 3)), train.images[0:9:3])
    assert torch.equal(train.get_batch(np.array([1, 2])), train.images[1:3])


@pytest.mark.parametrize("layout", ["flat", "torchvision", "plain"])
def test_fashion_mnist_from_root(isolated, layout):
    root = isolated / "root"
    folder = root / "FashionMNIST" / "raw" if layout == "torchvision" else root
    written = _write_fashion(folder, gz=layout != "plain")
    for split in ("train", "test"):
        s = D.load_split("fashion-mnist", split, root=str(root), download=False)
        images, labels = written[split]
        assert s.images.shape == (len(labels), 1, 28, 28)
        assert torch.equal(s.images[:, 0], torch.from_numpy(images))
        assert torch.equal(s.labels, torch.from_numpy(labels.astype(np.int64)))
        assert s.classes == D.FASHION_MNIST_CLASSES


def test_fashion_mnist_from_env(isolated, monkeypatch):
    written = _write_fashion(isolated / "envdata" / "FashionMNIST" / "raw", n_train=4, seed=3)
    monkeypatch.setenv("KTNAS_DATA", str(isolated / "envdata"))
    s = D.load_split("fashion-mnist", "train", download=False)
    assert torch.equal(s.images[:, 0], torch.from_numpy(written["train"][0]))


@pytest.mark.parametrize("damage", ["truncate_gz", "truncate_idx", "bad_magic"])
def test_fashion_mnist_corrupt_file(isolated, damage):
    root = isolated / "root"
    _write_fashion(root, n_train=6)
    target = root / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    if damage == "truncate_gz":
        target.write_bytes(gzip.compress(raw)[:-20])
    elif damage == "truncate_idx":
        target.write_bytes(gzip.compress(raw[:-100]))
    else:
        target.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))
    with pytest.raises(KtnasError) as err:
        D.load_split("fashion-mnist", "train", root=str(root), download=False)
    assert str(target) in _one_line(err)


def test_fashion_mnist_missing(isolated):
    root = isolated / "empty_root"
    root.mkdir()
    with pytest.raises(KtnasError) as err:
        D.load_split("fashion-mnist", "test", root=str(root), download=False)
    msg = _one_line(err)
    assert "dataset-fashion-mnist" in msg and str(root) in msg and "--data-root" in msg


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic_and_sized():
    a = D.load_split("synthetic", "train", synthetic_sizes=(300, 120), seed=1)
    D._CACHE.clear()
    b = D.load_split("synthetic", "train", synthetic_sizes=(300, 120), seed=1)
    assert a is not b and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.fingerprint == b.fingerprint
    assert a.images.shape == (300, 3, 32, 32) and a.images.dtype == torch.uint8
    test = D.load_split("synthetic", "test", synthetic_sizes=(300, 120), seed=1)
    assert len(test) == 120 and test.fingerprint != a.fingerprint
    assert not torch.equal(test.images, a.images[:120])
    other = D.load_split("synthetic", "train", synthetic_sizes=(300, 120), seed=2)
    assert not torch.equal(other.images, a.images) and other.fingerprint != a.fingerprint
    assert a.num_classes == 10 and int(a.labels.max()) <= 9
    assert len(torch.unique(a.labels)) == 10
    assert float(a.images.float().std()) > 20  # real patterns, not flat images


def test_synthetic_classes_learnable():
    train = D.load_split("synthetic", "train", synthetic_sizes=(3000, 1000), seed=0)
    test = D.load_split("synthetic", "test", synthetic_sizes=(3000, 1000), seed=0)

    def features(x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    f_train, f_test = features(train.images), features(test.images)
    means = torch.stack([f_train[train.labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(f_test, means).argmin(1) == test.labels).float().mean().item()
    assert accuracy > 0.6


# ----------------------------------------------------------------------------- image folders

def _make_imagefolder(base, classes=("cat", "dog", "eel"), per_class=2):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for ci, name in enumerate(classes):
            d = base / split / name
            d.mkdir(parents=True)
            for k in range(per_class):
                h, w = 10 + 7 * k + ci, 13 + 5 * ci
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                mode_img = Image.fromarray(arr)
                if k == 1:
                    mode_img = mode_img.convert("L")  # grayscale files must come out RGB too
                mode_img.save(d / f"img{k}.png")


def test_imagefolder(tmp_path):
    _make_imagefolder(tmp_path)
    s = D.load_split(f"imagefolder:{tmp_path}", "train", image_size=16)
    assert s.dataset == f"imagefolder:{os.path.abspath(tmp_path)}" and s.images is None
    assert s.classes == ["cat", "dog", "eel"] and s.num_classes == 3 and len(s) == 6
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    batch = s.get_batch([0, 3, 5])
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == torch.uint8 and batch.is_contiguous()
    assert torch.equal(s.get_batch(slice(3, 4)), batch[1:2])
    assert torch.equal(s.get_batch(torch.tensor([5])), batch[2:])
    assert s.get_batch([]).shape == (0, 3, 16, 16)
    gray = s.get_batch([1])[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    test = D.load_split(f"imagefolder:{tmp_path}", "test", image_size=16)
    assert test.fingerprint != s.fingerprint
    assert D.load_split(f"imagefolder:{tmp_path}", "train", image_size=16).fingerprint == s.fingerprint
    assert D.load_split(f"imagefolder:{tmp_path}", "train", image_size=8).fingerprint != s.fingerprint


def test_imagefolder_val_and_errors(tmp_path):
    _make_imagefolder(tmp_path)
    with pytest.raises(KtnasError) as err:
        D.load_split(f"imagefolder:{tmp_path}", "train")
    assert "image size" in _one_line(err)
    with pytest.raises(KtnasError) as err:
        D.load_split(f"imagefolder:{tmp_path / 'nowhere'}", "train", image_size=8)
    assert "nowhere" in _one_line(err)
    (tmp_path / "test").rename(tmp_path / "val")
    assert len(D.load_split(f"imagefolder:{tmp_path}", "test", image_size=8)) == 6
    (tmp_path / "val" / "fox").mkdir()
    Image.new("RGB", (5, 5)).save(tmp_path / "val" / "fox" / "a.png")
    with pytest.raises(KtnasError) as err:  # a test class the train split does not have
        D.load_split(f"imagefolder:{tmp_path}", "test", image_size=8)
    assert "'fox' name none of train/'s (cat, dog, eel)" in _one_line(err)


def test_imagefolder_test_classes_map_onto_the_train_classes_by_name(tmp_path):
    """A test split with fewer classes, other case and separators: its labels still mean the train classes
    (ImageFolder alone would number its folders 0, 1 in its own order: wrong labels, silently)."""
    _make_imagefolder(tmp_path, classes=("Ankle boot", "Bag", "T-shirt_top"))
    shutil.rmtree(tmp_path / "test" / "Bag")
    (tmp_path / "test" / "Ankle boot").rename(tmp_path / "test" / "ankle_boot")
    (tmp_path / "test" / "T-shirt_top").rename(tmp_path / "test" / "t-shirt-top")
    test = D.load_split(f"imagefolder:{tmp_path}", "test", image_size=8)
    assert test.classes == ["Ankle boot", "Bag", "T-shirt_top"] and test.num_classes == 3
    assert test.labels.tolist() == [0, 0, 2, 2]
    for p, y in zip(test._paths, test.labels.tolist()):
        assert os.path.basename(os.path.dirname(p)) == ("ankle_boot", None, "t-shirt-top")[y]
    # precompute stores those labels, and the train split's classes
    import warnings

    from ktnas.cache.precompute import precompute
    from ktnas.cache.store import open_store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precompute(dataset=f"imagefolder:{tmp_path}", stem="mobilenet_v2:features.1", weights="none", image_size=16,
                   out=str(tmp_path / "s.zarr"), progress=False)
    with open_store(tmp_path / "s.zarr") as st:
        assert st.attrs["classes"] == ["Ankle boot", "Bag", "T-shirt_top"]
        assert st.split("test").read_labels().tolist() == [0, 0, 2, 2]
        assert st.split("train").read_labels().tolist() == [0, 0, 1, 1, 2, 2]


# ----------------------------------------------------------------------------- name errors, CIFAR

def test_unknown_dataset_and_split():
    with pytest.raises(KtnasError) as err:
        D.load_split("mnist-ish", "train")
    msg = _one_line(err)
    assert "mnist-ish" in msg and all(name in msg for name in D.DATASETS)
    with pytest.raises(KtnasError) as err:
        D.load_split("synthetic", "validation")
    assert "validation" in _one_line(err)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing(tmp_path, name):
    with pytest.raises(KtnasError) as err:
        D.load_split(name, "train", root=str(tmp_path), download=False)
    msg = _one_line(err)
    assert str(tmp_path) in msg and "--data-root" in msg
