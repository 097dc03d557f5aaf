"""Evaluation networks built from a genotype, and the exported model (frozen stem + trained cells).

The networks are the search spaces' own (``ktnas.engine.spaces``: DARTS' NetworkCIFAR, NAS-Bench-201's
TinyNetwork); their layout comes from the one layout rule (``ktnas.engine.layout``). Two inputs:
- ``in_channels=None``: the classic conv stem on raw 32 px images (3x3 conv to 3C + BN for DARTS, to C for NB201):
  exactly the paper's network, for the classic baseline.
- ``in_channels=C_stem, in_size=H``: cached features of a frozen stem ``[B, C_stem, H, H]``; the stem replaces
  the paper network's stages above H px, and a trainable adapter (1x1 conv + BN) feeds the rest. With the
  default stem (``mobilenet_v2:features.3`` at 64 px, 24x16x16) and the DARTS defaults (20 cells, C=36), cells
  7-19 remain: 6 normal cells at 16x16 (C=72), the reduction cell 13 (auxiliary head after it), 6 normal cells at
  8x8. NB201 (5 cells per stage, C=16): stages at 16x16 (C=32) and 8x8 (C=64).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ktnas.cache.errors import KtnasError, first_line
from ktnas.cache.stems import FrozenStem, Preprocessing, get_stem

from ktnas.engine.layout import resolve_layout
from ktnas.engine.runs import atomic_save
from ktnas.engine.spaces import genotype_from_json, space_of

FORMAT = "ktnas-model"
FORMAT_VERSION = 2  # 2: network_config's layers/channels/reductions are the built layout (1: the paper network's)


def input_stem(in_channels: int | None, C_out: int) -> nn.Sequential:
    """The classic 3x3 conv stem on RGB images, or the adapter (1x1 conv + BN) on a frozen stem's features."""
    if in_channels is None:
        return nn.Sequential(nn.Conv2d(3, C_out, 3, padding=1, bias=False), nn.BatchNorm2d(C_out))
    return nn.Sequential(nn.Conv2d(in_channels, C_out, 1, bias=False), nn.BatchNorm2d(C_out))


def network_layout(genotype, *, layers=None, channels=None, reductions=None, in_channels=None, in_size=None,
                   reference=None):
    """The built layout of a genotype's evaluation network (see :func:`ktnas.engine.layout.resolve_layout`)."""
    if isinstance(genotype, dict):
        genotype = genotype_from_json(genotype)
    return resolve_layout(space_of(genotype), in_size if in_channels is not None else None, "eval", layers=layers,
                          channels=channels, reductions=reductions, reference=reference)


def build_network(genotype, num_classes: int, *, layers: int | None = None, channels: int | None = None,
                  reductions=None, auxiliary: bool = False, in_channels: int | None = None,
                  in_size: int | None = None) -> nn.Module:
    """The evaluation network of a genotype (object or its JSON dict): ``layers`` cells as built (NB201: its
    ResNet blocks included), ``channels`` the first cells' width, by default the paper's network (DARTS 20 cells,
    C=36; NB201 3 stages of 5 cells, C=16) minus what the stem replaces. ``in_channels``/``in_size``: a frozen
    stem's features as input (None: the classic conv stem on images)."""
    if isinstance(genotype, dict):
        genotype = genotype_from_json(genotype)
    space = space_of(genotype)
    layout = network_layout(genotype, layers=layers, channels=channels, reductions=reductions,
                            in_channels=in_channels, in_size=in_size)
    C_stem = space.stem_multiplier * layout.channels
    return space.network(genotype, num_classes, layout, stem=input_stem(in_channels, C_stem), stem_channels=C_stem,
                         auxiliary=auxiliary)


def network_config(genotype, num_classes: int, *, auxiliary: bool, in_channels, in_size, **layout) -> dict:
    """What ``model.pt`` records to rebuild the network: the built layout, explicit."""
    lay = network_layout(genotype, in_channels=in_channels, in_size=in_size, **layout)
    return dict(num_classes=int(num_classes), layers=lay.layers, channels=lay.channels,
                reductions=list(lay.reductions), auxiliary=bool(auxiliary), in_channels=in_channels, in_size=in_size)


# --------------------------------------------------------------------------------------- exported model
class KtnasModel(nn.Module):
    """Frozen stem + trained network: ``forward(images)`` maps raw images (uint8 0..255 or float 0..1, 1 or 3
    channels, any size) to logits."""

    def __init__(self, stem: FrozenStem, net: nn.Module):
        super().__init__()
        self.stem = stem
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.stem(images))[0]


def save_model(path, stem: FrozenStem, net: nn.Module, genotype, network_config: dict, meta: dict | None = None):
    """Write ``path`` (torch.save of plain data and tensors only: loads with ``weights_only=True``)."""
    g = genotype if isinstance(genotype, dict) else genotype.to_json()
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "stem": {"spec": stem.spec, "weights": stem.weights_source, "preprocessing": stem.preprocessing.to_dict(),
                 "fingerprint": stem.fingerprint,
                 "state_dict": {k: v.detach().cpu() for k, v in stem.body.state_dict().items()}},
        "genotype": g, "network_config": dict(network_config),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "meta": dict(meta or {}),
    }
    atomic_save(payload, path)


def rebuild_stem(spec: str, preprocessing: dict, state_dict: dict, weights_source: str) -> FrozenStem:
    """A FrozenStem of ``spec`` with the given tensors (no weight file or network needed)."""
    pre = Preprocessing(int(preprocessing["image_size"]), tuple(preprocessing["mean"]), tuple(preprocessing["std"]),
                        preprocessing.get("interpolation", "bilinear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shell = get_stem(spec, "none", pre.image_size, pre.mean, pre.std)
    shell.body.load_state_dict(state_dict)
    return FrozenStem(shell.spec, shell.body, pre, weights_source, shell.channels, shell.stride)


def load_model(path) -> KtnasModel:
    """Rebuild the exported model of ``path`` (eval mode, on the CPU), checking the stem's fingerprint.
    A missing, unreadable or foreign file is a one-line KtnasError."""
    hint = "pass a model.pt written by `ktnas train`"
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KtnasError(f"{path}: no such model file; {hint}") from None
    except Exception as e:
        reason = first_line(e)
        raise KtnasError(f"{path}: not a readable model file ({type(e).__name__}: {reason}); {hint}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise KtnasError(f"{path}: not a ktnas model (no format '{FORMAT}'); {hint}")
    if d.get("format_version") not in (1, FORMAT_VERSION):
        raise KtnasError(f"{path}: ktnas model format {d.get('format_version')!r}, this version reads "
                         f"{FORMAT_VERSION}; retrain or export it again")
    try:
        s = d["stem"]
        stem = rebuild_stem(s["spec"], s["preprocessing"], s["state_dict"], s["weights"])
        cfg = dict(d["network_config"])
        if d["format_version"] == 1:  # layers/channels of the paper's network, before the stem replaced cells
            cfg.update(reference=(cfg.pop("layers"), cfg.pop("channels")))
            cfg.update(network_layout(d["genotype"], **cfg).as_dict())
            cfg.pop("reference")
        net = build_network(d["genotype"], **cfg)
        net.load_state_dict(d["state_dict"])
    except KtnasError as e:
        raise KtnasError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = first_line(e)
        raise KtnasError(f"{path}: damaged ktnas model ({type(e).__name__}: {reason}); {hint}") from None
    if stem.fingerprint != s["fingerprint"]:
        raise KtnasError(f"{path}: the stem's tensors give fingerprint {stem.fingerprint[:12]}, the file records "
                         f"{str(s['fingerprint'])[:12]}: the file is damaged or was edited; export it again")
    model = KtnasModel(stem, net).eval()
    model.meta = d.get("meta", {})
    return model
