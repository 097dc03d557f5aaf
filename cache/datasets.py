"""Image datasets for the search: one uniform, uint8 view of each train/test split.

``load_split`` returns an :class:`ImageSplit` whose ``get_batch`` yields uint8 ``[B, C, H, W]``
tensors. Fashion-MNIST, CIFAR and the synthetic set are held in memory; ``imagefolder:PATH``
sets are listed up front and decoded lazily, batch by batch.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import KtnasError

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH", "synthetic", "synthetic:TRAIN/TEST")
SPLITS = ("train", "test")

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ktnas", "data")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALIASES = {
    "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist", "cifar10": "cifar10", "cifar-10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100", "synthetic": "synthetic",
}
SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZE = 32

_CACHE: dict[tuple, "ImageSplit"] = {}


@dataclass
class ImageSplit:
    """One split of a dataset: labels, class names, a content fingerprint and the pixels.

    ``images`` is a uint8 ``[N, C, H, W]`` tensor for in-memory sets and ``None`` for
    ``imagefolder`` sets, whose files are decoded on demand by :meth:`get_batch`.
    """

    dataset: str
    split: str
    labels: torch.Tensor = field(repr=False)
    num_classes: int
    classes: list[str] = field(repr=False)
    fingerprint: str
    images: torch.Tensor | None = field(default=None, repr=False)
    _paths: list[str] | None = field(default=None, repr=False)
    _image_size: int | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def get_batch(self, indices) -> torch.Tensor:
        """Return the images at ``indices`` (slice, range, list/array/LongTensor of ints) as
        a contiguous uint8 ``[B, C, H, W]`` tensor."""
        if isinstance(indices, slice):
            if self.images is not None:
                return self.images[indices].contiguous()
            idx = torch.arange(len(self))[indices]
        else:
            idx = _as_index_tensor(indices)
        if self.images is not None:
            return self.images[idx].contiguous()
        size = self._image_size
        if idx.numel() == 0:
            return torch.empty((0, 3, size, size), dtype=torch.uint8)
        n = len(self)
        if int(idx.min()) < -n or int(idx.max()) >= n:
            raise IndexError(f"indices out of range for a split of {n} images")
        return torch.stack([_decode_image(self._paths[i], size) for i in idx.tolist()]).contiguous()


def load_split(dataset: str, split: str, *, root: str | None = None, image_size: int | None = None,
               download: bool = True, synthetic_sizes: tuple[int, int] = (10000, 2000),
               seed: int = 0) -> ImageSplit:
    """Load one split ("train" or "test") of ``dataset`` (one of :data:`DATASETS`).

    ``root`` is a data folder (Fashion-MNIST files, a torchvision root); ``$KTNAS_DATA`` is
    the fallback. ``image_size`` is required for ``imagefolder:PATH`` (images are resized to
    it) and ignored by in-memory sets, which keep their native size. ``download`` allows
    torchvision downloads when local files are missing. ``synthetic_sizes`` (train N, test N)
    and ``seed`` define the synthetic set. In-memory splits are cached per process: repeated
    calls with the same arguments return the same object.
    """
    if split not in SPLITS:
        raise KtnasError(f"unknown split {split!r}: use 'train' or 'test'")
    name = str(dataset).strip()
    if name.lower().startswith("imagefolder:"):
        return _load_imagefolder(name[len("imagefolder:"):], split, image_size)
    if name.lower().startswith("synthetic:"):  # synthetic:TRAIN/TEST sizes, e.g. synthetic:1000/200
        try:
            synthetic_sizes = tuple(int(t) for t in name.split(":", 1)[1].split("/"))
            assert len(synthetic_sizes) == 2
        except (ValueError, AssertionError):
            raise KtnasError(f"bad data set {dataset!r}: write synthetic sizes as synthetic:TRAIN/TEST, "
                             "e.g. synthetic:1000/200") from None
        name = "synthetic"
    canonical = _ALIASES.get(name.lower())
    if canonical is None:
        raise KtnasError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    root = os.path.abspath(os.path.expanduser(root)) if root else None
    env = os.environ.get("KTNAS_DATA") or None
    if canonical == "fashion-mnist":
        key = (canonical, split, root, env, DEBIAN_FASHION_MNIST_DIR, DEFAULT_DATA_DIR)
    elif canonical == "synthetic":
        key = (canonical, split, tuple(int(s) for s in synthetic_sizes), int(seed))
    else:
        key = (canonical, split, root or env or DEFAULT_DATA_DIR)
    if key not in _CACHE:
        if canonical == "fashion-mnist":
            result = _load_fashion_mnist(split, root, env, download)
        elif canonical == "synthetic":
            result = _load_synthetic(split, synthetic_sizes, int(seed))
        else:
            result = _load_cifar(canonical, split, key[2], download)
        _CACHE[key] = result
    return _CACHE[key]


# ----------------------------------------------------------------------------- helpers

def _as_index_tensor(indices) -> torch.Tensor:
    if isinstance(indices, range):
        return torch.arange(indices.start, indices.stop, indices.step, dtype=torch.long)
    if isinstance(indices, (list, tuple)) and len(indices) == 0:
        return torch.empty(0, dtype=torch.long)
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"get_batch needs integer indices, got dtype {idx.dtype}")
    return idx.reshape(-1).to(torch.long)


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split()) or "no detail"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(repr((tuple(images.shape), tuple(labels.shape))).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _in_memory(dataset, split, images, labels, classes) -> ImageSplit:
    return ImageSplit(dataset=dataset, split=split, labels=labels, num_classes=len(classes),
                      classes=list(classes), fingerprint=_fingerprint(images, labels),
                      images=images)


# ----------------------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzip or plain) with ``ndim`` dimensions."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise KtnasError(f"cannot read {path} ({_short(e)}): the file is truncated or corrupt, "
                         f"replace it with a fresh copy") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise KtnasError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (bad magic number "
                         f"or header): replace it with a fresh copy")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + int(np.prod(dims)):
        raise KtnasError(f"{path} holds {len(raw) - header} data bytes but its header says "
                         f"{'x'.join(map(str, dims))}: the file is truncated or corrupt, "
                         f"replace it with a fresh copy")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folder: str, stem: str) -> str | None:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def _load_fashion_mnist(split: str, root: str | None, env: str | None, download: bool) -> ImageSplit:
    folders = []
    for base in (root, env):
        if base:
            folders += [base, os.path.join(base, "FashionMNIST", "raw")]
    folders += [DEBIAN_FASHION_MNIST_DIR, os.path.join(DEFAULT_DATA_DIR, "FashionMNIST", "raw")]
    image_stem, label_stem = _FASHION_FILES[split]
    for folder in folders:
        image_path, label_path = _find_file(folder, image_stem), _find_file(folder, label_stem)
        if image_path and label_path:
            images, labels = _read_idx(image_path, 3), _read_idx(label_path, 1)
            if images.shape[1:] != (28, 28):
                raise KtnasError(f"{image_path} holds {images.shape[1]}x{images.shape[2]} images, "
                                 f"not 28x28: point --data-root at genuine Fashion-MNIST files")
            if images.shape[0] != labels.shape[0] or labels.max(initial=0) > 9:
                raise KtnasError(f"{label_path} does not match {image_path} ({labels.shape[0]} labels "
                                 f"for {images.shape[0]} images, or labels above 9): "
                                 f"replace both with fresh copies")
            return _in_memory("fashion-mnist", split, torch.from_numpy(images.copy()).unsqueeze(1),
                              torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES)
    looked = ", ".join(dict.fromkeys(folders))
    fix = ("install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
           "or pass --data-root to a folder holding the *-ubyte.gz files")
    if not download:
        raise KtnasError(f"Fashion-MNIST files not found (looked in: {looked}) and downloads are "
                         f"disabled: {fix}")
    try:
        import torchvision

        ds = torchvision.datasets.FashionMNIST(root=root or DEFAULT_DATA_DIR, train=split == "train",
                                               download=True)
    except Exception as e:  # torchvision raises many types when offline
        raise KtnasError(f"Fashion-MNIST files not found (looked in: {looked}) and the download "
                         f"failed ({_short(e)}): {fix}") from None
    return _in_memory("fashion-mnist", split, ds.data.to(torch.uint8).unsqueeze(1).contiguous(),
                      torch.as_tensor(ds.targets, dtype=torch.int64), FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------- CIFAR

def _load_cifar(name: str, split: str, root: str, download: bool) -> ImageSplit:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    pretty = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    fix = (f"pass --data-root to a torchvision CIFAR root (the folder holding {cls.base_folder}/), "
           f"or go online so it can be downloaded")
    try:
        ds = cls(root=root, train=split == "train", download=False)
    except Exception:
        if not download:
            raise KtnasError(f"{pretty} not found under {root} and downloads are disabled: {fix}") from None
        try:
            ds = cls(root=root, train=split == "train", download=True)
        except Exception as e:
            raise KtnasError(f"{pretty} not found under {root} and the download failed "
                             f"({_short(e)}): {fix}") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return _in_memory(name, split, images, torch.as_tensor(ds.targets, dtype=torch.int64), ds.classes)


# ----------------------------------------------------------------------------- image folders

def _split_dir(base: str, split: str) -> str | None:
    for sub in (("train",) if split == "train" else ("test", "val")):
        path = os.path.join(base, sub)
        if os.path.isdir(path):
            return path
    return None


def _load_imagefolder(path: str, split: str, image_size: int | None) -> ImageSplit:
    import torchvision

    if not path.strip():
        raise KtnasError("imagefolder needs a path: use imagefolder:/path/to/data "
                         "(holding train/ and test/ class subfolders)")
    base = os.path.abspath(os.path.expanduser(path.strip()))
    name = f"imagefolder:{base}"
    if image_size is None or int(image_size) <= 0:
        raise KtnasError(f"{name} needs an image size (images are resized to SxS): "
                         f"pass --image-size, e.g. --image-size 64")
    image_size = int(image_size)
    folder = _split_dir(base, split)
    if folder is None:
        wanted = "train/" if split == "train" else "test/ (or val/)"
        raise KtnasError(f"{name}: no {wanted} folder under {base}: create it with one "
                         f"subfolder of images per class (torchvision ImageFolder layout)")
    try:
        ds = torchvision.datasets.ImageFolder(folder)
    except (FileNotFoundError, OSError) as e:
        raise KtnasError(f"{name}: cannot list images in {folder} ({_short(e)}): put one "
                         f"subfolder of images per class in it") from None
    classes, labels = list(ds.classes), torch.tensor([t for _, t in ds.samples], dtype=torch.int64)
    train_dir = _split_dir(base, "train") if split != "train" else None
    if train_dir is not None:  # the labels mean the train split's classes: folders mapped by name
        from .classes import class_mapping

        try:
            train_classes, _ = ds.find_classes(train_dir)
        except (FileNotFoundError, OSError):  # an empty train/: the split's own classes
            train_classes = classes
        table = torch.tensor(class_mapping(classes, train_classes, f"{name} {os.path.basename(folder)}/",
                                           f"{os.path.basename(train_dir)}/"), dtype=torch.int64)
        classes, labels = list(train_classes), table[labels]
    paths = [p for p, _ in ds.samples]
    h = hashlib.sha256()
    for rel, size, label in sorted((os.path.relpath(p, base).replace(os.sep, "/"),
                                    os.path.getsize(p), int(t)) for p, t in zip(paths, labels)):
        h.update(f"{rel}\t{size}\t{label}\n".encode())
    h.update(f"image_size={image_size}".encode())
    return ImageSplit(dataset=name, split=split, labels=labels, num_classes=len(classes),
                      classes=classes, fingerprint=h.hexdigest(), images=None,
                      _paths=paths, _image_size=image_size)


def _decode_image(path: str, size: int) -> torch.Tensor:
    from PIL import Image
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    try:
        with Image.open(path) as img:
            tensor = TF.pil_to_tensor(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise KtnasError(f"cannot decode image {path} ({_short(e)}): remove or replace the file") from None
    if tensor.shape[1:] != (size, size):
        tensor = TF.resize(tensor, [size, size], interpolation=InterpolationMode.BILINEAR,
                           antialias=True)
    return tensor


# ----------------------------------------------------------------------------- synthetic

def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs of shape [N], output [N, 3] in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render class-structured gratings: class c has its own hue, orientation and frequency;
    each sample gets a random phase, jittered hue/orientation/frequency, brightness and noise."""
    n, s = labels.shape[0], SYNTHETIC_SIZE
    c = labels.astype(np.float64)
    hue = (c / SYNTHETIC_CLASSES + rng.uniform(-0.035, 0.035, n)) % 1.0
    fg = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0, n), rng.uniform(0.6, 1.0, n))
    bg = rng.uniform(0.05, 0.45, (n, 1)) + rng.uniform(-0.05, 0.05, (n, 3))
    theta = c * np.pi / SYNTHETIC_CLASSES + rng.uniform(-np.pi / 40, np.pi / 40, n)
    freq = (1.5 + 0.75 * (labels % 4)) * rng.uniform(0.85, 1.15, n)
    phase = rng.uniform(0.0, 2.0 * np.pi, n)
    coords = (np.arange(s) - (s - 1) / 2.0) / s
    y, x = np.meshgrid(coords, coords, indexing="ij")
    proj = np.cos(theta)[:, None, None] * x + np.sin(theta)[:, None, None] * y
    wave = 0.5 + 0.5 * np.sin(2.0 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
    img = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * wave[:, None, :, :]
    img = img * rng.uniform(0.75, 1.15, (n, 1, 1, 1))
    img = img + rng.normal(0.0, 0.06, img.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _load_synthetic(split: str, sizes: tuple[int, int], seed: int) -> ImageSplit:
    n = int(sizes[0] if split == "train" else sizes[1])
    if n <= 0:
        raise KtnasError(f"synthetic {split} size must be positive, got {n}: pass a positive size")
    rng = np.random.default_rng(np.random.SeedSequence([abs(seed), int(seed < 0), SPLITS.index(split), 0x5E17]))
    labels = rng.integers(0, SYNTHETIC_CLASSES, n)
    chunk = 1024  # fixed, so the random stream (and hence the data) never depends on memory
    images = np.concatenate([_synthetic_images(labels[i:i + chunk], rng) for i in range(0, n, chunk)])
    return _in_memory("synthetic", split, torch.from_numpy(images),
                      torch.from_numpy(labels.astype(np.int64)),
                      [f"class{i}" for i in range(SYNTHETIC_CLASSES)])


def augment(x: torch.Tensor, indices, view: int, seed: int, split: str) -> torch.Tensor:
    """Random crop (zero padding of image_size/8) + horizontal flip of prepared images ``x`` [B, 3, S, S],
    drawn per (seed, split, sample index, view), so a sample's views are the same in every run and batching."""
    s = x.shape[-1]
    pad = max(1, s // 8)
    xp = F.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    sid = zlib.crc32(split.encode())
    for j, idx in enumerate(indices):
        dy, dx, flip = np.random.default_rng([seed, sid, int(idx), view]).integers(0, [2 * pad + 1, 2 * pad + 1, 2])
        crop = xp[j, :, dy:dy + s, dx:dx + s]
        out[j] = crop.flip(-1) if flip else crop
    return out
