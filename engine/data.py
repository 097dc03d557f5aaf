"""The data of a run: the search split of a train set, batches of in-memory images, the search's data wiring."""
from __future__ import annotations

import math

import numpy as np
import torch


def split_indices(n: int, seed: int, portion: float) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` samples split by a permutation seeded by ``seed``: (the first ``portion``, the rest),
    each sorted; both non-empty."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = min(max(1, int(round(n * portion))), n - 1)
    return np.sort(perm[:cut]), np.sort(perm[cut:])


class ImageBatches:
    """Batches of ``fetch(idx, epoch) -> (x, y)`` over ``indices``, on ``device``. With ``shuffle`` the order of
    each epoch is a permutation seeded by (seed, epoch, *key); rank ``rank`` of ``world_size`` takes the slice
    [rank*L, (rank+1)*L) of it, L = ceil(n / world_size), wrapping around at the end (as ``FeatureLoader``)."""

    def __init__(self, fetch, indices, batch_size: int, *, seed: int, device, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, key=(0,)):
        self.fetch, self.indices = fetch, np.asarray(indices, dtype=np.int64)
        self.batch_size, self.seed, self.device, self.epoch = batch_size, seed, device, 0
        self.shuffle, self.key = shuffle, tuple(key)
        self.rank, self.per_rank = rank, math.ceil(len(self.indices) / world_size)

    @classmethod
    def of_tensors(cls, images: torch.Tensor, labels: torch.Tensor, indices, batch_size: int, seed: int, device,
                   rank: int = 0, world_size: int = 1) -> "ImageBatches":
        """Batches of in-memory tensors."""
        return cls(lambda idx, epoch: (images[idx], labels[idx]), indices, batch_size, seed=seed, device=device,
                   rank=rank, world_size=world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, *self.key]).permutation(order)
        L = self.per_rank
        order = torch.from_numpy(order[np.arange(self.rank * L, (self.rank + 1) * L) % len(order)])
        for s in range(0, len(order), self.batch_size):
            x, y = self.fetch(order[s:s + self.batch_size], self.epoch)
            yield x.to(self.device), y.to(self.device)

    def close(self) -> None:
        pass


def standardise_images(x: torch.Tensor) -> torch.Tensor:
    """Float images [n, c, h, w] in [0, 1] -> the classic search's input: 3 channels (1-channel images repeated),
    normalised by the per-channel mean and std of these images."""
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def image_tensors(dataset: str, limit: int | None, data_root=None, image_size: int = 32, seed: int = 0):
    """(split, images, labels): the first ``limit`` train images of ``dataset`` as the classic network reads them
    (native size for in-memory sets, ``image_size`` for image folders; :func:`standardise_images`)."""
    from ktnas.cache.datasets import load_split

    split = load_split(dataset, "train", root=data_root, image_size=image_size, seed=seed)
    n = len(split) if limit is None else min(limit, len(split))
    return split, standardise_images(split.get_batch(slice(0, n)).float().div_(255)), split.labels[:n].long()


def classic_images(store, n: int, data_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` train images ``store`` was built from, as the classic network reads them (images,
    labels); refused in one line when they are not the store's (another data set or version of it)."""
    from ktnas.cache.errors import KtnasError

    dataset = store.attrs.get("dataset")
    split, images, labels = image_tensors(dataset, n, data_root, 32, int(store.attrs.get("seed", 0)))
    want = store.attrs.get("dataset_fingerprints", {}).get("train")
    if want is not None and split.images is not None and split.fingerprint != want:
        raise KtnasError(f"the train images of {dataset} differ from those store {store.path} was built from: "
                         "pass the data folder it was built from (--data-root)")
    return images, labels


def cycle(loader):
    """``loader``'s batches over and over (the validation batches of a search epoch)."""
    while True:
        yield from loader


def feature_info(store) -> dict:
    """What the networks built on a feature store's train split need to know: channels, resolution, shape
    [C, H, W], classes, the stem's spec and image size."""
    sp = store.split("train")
    C, H, W = sp.shape[2:]
    ncls = store.attrs.get("num_classes") or int(sp.read_labels().max()) + 1
    return dict(in_channels=int(C), resolution=int(min(H, W)), shape=[int(C), int(H), int(W)],
                num_classes=int(ncls), stem=store.attrs.get("stem"),
                image_size=(store.attrs.get("preprocessing") or {}).get("image_size"))


def search_data(cfg, device, rank: int = 0, world_size: int = 1):
    """(info, make) for a search's stem: ``make(batch_size)`` gives (train batches, validation batches) of this
    rank's partition of the search split; info: channels, resolution, shape [C, H, W], classes, stem, split
    sizes. ``cfg.stem`` 'features': the store's cached features; 'none': the data set's images in memory."""
    if cfg.stem == "features":
        from ktnas.cache.store import open_store
        from ktnas.cache.stream import FeatureLoader

        store = open_store(cfg.features)
        sp = store.split("train")
        n = sp.shape[0] if cfg.limit is None else min(cfg.limit, sp.shape[0])
        tr, va = split_indices(n, cfg.seed, cfg.train_portion)
        info = dict(feature_info(store), train=len(tr), val=len(va))

        def make(batch_size):
            kw = dict(batch_size=batch_size, shuffle=True, device=device, seed=cfg.seed, rank=rank,
                      world_size=world_size)
            return FeatureLoader(store, "train", indices=tr, **kw), FeatureLoader(store, "train", indices=va, **kw)
        return info, make
    split, images, labels = image_tensors(cfg.dataset, cfg.limit, cfg.data_root, cfg.image_size, cfg.seed)
    n = len(labels)
    tr, va = split_indices(n, cfg.seed, cfg.train_portion)
    info = dict(in_channels=3, resolution=int(min(images.shape[2:])), shape=list(images.shape[1:]),
                num_classes=int(split.num_classes), stem=None, train=len(tr), val=len(va))

    def make(batch_size):
        return (ImageBatches.of_tensors(images, labels, tr, batch_size, cfg.seed, device, rank, world_size),
                ImageBatches.of_tensors(images, labels, va, batch_size, cfg.seed + 1, device, rank, world_size))
    return info, make


def image_shape(dataset, image_size: int, what: str = "the data set") -> tuple[int, int, int]:
    """The raw image shape (C, H, W) of ``dataset``'s first test image."""
    from ktnas.cache.datasets import load_split
    from ktnas.cache.errors import KtnasError

    try:
        x = load_split(dataset, "test", image_size=image_size).get_batch([0])
    except (KtnasError, OSError, TypeError) as e:
        raise KtnasError(f"{what} {dataset!r} cannot be read here ({str(e).splitlines()[0][:80]}): "
                         f"pass --input-shape C,H,W") from None
    return tuple(int(v) for v in x.shape[1:])
