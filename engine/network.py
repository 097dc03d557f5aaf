"""Evaluation networks built from a genotype, and the exported model (frozen stem + trained cells).

DARTS (``model.py``'s ``NetworkCIFAR``): ``layers`` cells of width C, reductions (width doubled) at cells
``layers // 3`` and ``2 * layers // 3``, each cell a genotype cell with preprocess0/1 (FactorizedReduce after a
reduction, else a 1x1 ReLUConvBN), drop path on non-identity ops in training, the concat nodes' outputs joined;
an optional auxiliary head after cell ``2 * layers // 3``; global pooling and a linear classifier.
NAS-Bench-201: three stages of ``layers`` cells (width C, 2C, 4C) joined by ResNet basic blocks of stride 2,
then BN + ReLU, global pooling and a linear classifier (no drop path, no auxiliary head).

Two inputs:
- ``in_channels=None``: the classic conv stem on raw 32 px images (3x3 conv to 3C + BN for DARTS, to C for NB201):
  exactly the paper's network, for the classic baseline.
- ``in_channels=C_stem, in_size=H``: cached features of a frozen stem ``[B, C_stem, H, H]``. The stem replaces
  the reference network's cells that ran at a higher resolution than its output. The reference network runs its
  stages at 32, 16 and 8 px (CIFAR input); every stage whose resolution is above H is dropped together with the
  reduction that ends it, and a trainable adapter (1x1 conv + BN to the width the conv stem would give at the
  first kept stage) feeds the rest. With the default stem (``mobilenet_v2:features.3`` at 64 px, 24x16x16) and
  the DARTS defaults (20 cells, C=36): cells 0-6 (the 32 px stage and the first reduction) are replaced, cells
  7-19 remain: 6 normal cells at 16x16 (C=72), the reduction cell 13 (C=144, 8x8, auxiliary head after it),
  6 normal cells at 8x8. NB201 (5 cells per stage, C=16): stages at 16x16 (C=32) and 8x8 (C=64).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from ktnas.cache.errors import KtnasError, first_line
from ktnas.cache.stems import FrozenStem, Preprocessing, get_stem

from .ops import OPS, FactorizedReduce, ReLUConvBN
from .spaces import DartsGenotype, NB201Genotype, genotype_from_json

REFERENCE_SIZE = 32  # the papers' networks run their three stages at 32, 16 and 8 px
DEFAULTS = {"darts": dict(layers=20, channels=36), "nb201": dict(layers=5, channels=16)}
FORMAT = "ktnas-model"
FORMAT_VERSION = 1


def dropped_stages(in_size: int | None) -> int:
    """How many of the reference network's three stages ran at a higher resolution than ``in_size`` (at most 2)."""
    if in_size is None:
        return 0
    return sum(REFERENCE_SIZE >> k > in_size for k in range(2))


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob``, scale the rest by 1 / keep (DARTS' drop_path)."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x.div(keep).mul(mask)


def _input_stem(in_channels: int | None, C_out: int) -> nn.Sequential:
    """The classic 3x3 conv stem on RGB images, or the adapter (1x1 conv + BN) on a frozen stem's features."""
    if in_channels is None:
        return nn.Sequential(nn.Conv2d(3, C_out, 3, padding=1, bias=False), nn.BatchNorm2d(C_out))
    return nn.Sequential(nn.Conv2d(in_channels, C_out, 1, bias=False), nn.BatchNorm2d(C_out))


# ------------------------------------------------------------------------------------------------- DARTS
class Cell(nn.Module):
    """A DARTS evaluation cell: two inputs, ``steps`` nodes of two ops each, the concat nodes as output."""

    def __init__(self, genotype: DartsGenotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.preprocess0 = FactorizedReduce(C_prev_prev, C) if reduction_prev else \
            ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        gene, self.concat = (genotype.reduce, genotype.reduce_concat) if reduction else \
            (genotype.normal, genotype.normal_concat)
        self.reduction = reduction
        self.multiplier = len(self.concat)
        self.indices = [idx for _, idx in gene]
        self.ops = nn.ModuleList(OPS[name](C, 2 if reduction and idx < 2 else 1, True) for name, idx in gene)

    def forward(self, s0, s1, drop_prob: float = 0.0):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            hs = []
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.indices[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], nn.Identity):
                    h = drop_path(h, drop_prob)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS' auxiliary head, with an adaptive 2x2 pooling (DARTS: 5x5 stride 3, on 8x8 only) so any size works."""

    def __init__(self, C, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU())
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class NetworkDARTS(nn.Module):
    """DARTS' NetworkCIFAR; see the module docstring for the layout. ``forward`` -> (logits, aux logits or None)."""

    def __init__(self, genotype: DartsGenotype, num_classes: int, layers: int = 20, C: int = 36,
                 auxiliary: bool = False, in_channels: int | None = None, in_size: int | None = None,
                 stem_multiplier: int = 3):
        super().__init__()
        if layers < 3:
            raise KtnasError(f"a DARTS network needs at least 3 cells (two reductions), got --layers {layers}")
        reductions = (layers // 3, 2 * layers // 3)
        d = dropped_stages(in_size) if in_channels is not None else 0
        first = reductions[d - 1] + 1 if d else 0
        if auxiliary and first > reductions[1]:
            raise KtnasError(f"the auxiliary head sits after cell {reductions[1]}, which the stem replaces "
                             f"(features of {in_size} px): drop --auxiliary")
        C_curr = C * 2 ** d
        C_stem = stem_multiplier * C_curr
        self.stem = _input_stem(in_channels, C_stem)
        self.layout = [f"{'adapter 1x1' if in_channels else 'conv stem 3x3'} -> {C_stem}"]
        self.drop_path_prob = 0.0
        self.cells = nn.ModuleList()
        self.aux_index = None
        C_pp, C_p, reduction_prev = C_stem, C_stem, False
        for i in range(first, layers):
            reduction = i in reductions
            C_curr = C_curr * 2 if reduction else C_curr
            cell = Cell(genotype, C_pp, C_p, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cell.multiplier * C_curr
            self.layout.append(f"cell {i}: {'reduce' if reduction else 'normal'} C={C_curr} -> {C_p}")
            if auxiliary and i == reductions[1]:
                self.aux_index, C_aux = len(self.cells) - 1, C_p
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)

    def forward(self, x):
        s0 = s1 = self.stem(x)
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux


NetworkCIFAR = NetworkDARTS


# ------------------------------------------------------------------------------------------------- NB201
class NB201Cell(nn.Module):
    """NAS-Bench-201's InferCell: node j is the sum of its incoming edges' ops; the last node is the output."""

    def __init__(self, genotype: NB201Genotype, C):
        super().__init__()
        self.sources = [[src for _, src in node] for node in genotype.edges]
        self.ops = nn.ModuleList(nn.ModuleList(OPS[op](C, 1, True) for op, _ in node) for node in genotype.edges)

    def forward(self, x):
        nodes = [x]
        for ops, sources in zip(self.ops, self.sources):
            nodes.append(sum(op(nodes[s]) for op, s in zip(ops, sources)))
        return nodes[-1]


class ResNetBasicBlock(nn.Module):
    """NAS-Bench-201's reduction: two ReLUConvBN 3x3 (the first strided) + an avg-pool, 1x1 conv shortcut."""

    def __init__(self, C_in, C_out, stride=2):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, stride, 1)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, stride=2), nn.Conv2d(C_in, C_out, 1, bias=False))

    def forward(self, x):
        return self.conv_b(self.conv_a(x)) + self.downsample(x)


class NetworkNB201(nn.Module):
    """NAS-Bench-201's TinyNetwork of ``N`` cells per stage; ``forward`` -> (logits, None)."""

    def __init__(self, genotype: NB201Genotype, num_classes: int, N: int = 5, C: int = 16,
                 in_channels: int | None = None, in_size: int | None = None):
        super().__init__()
        d = dropped_stages(in_size) if in_channels is not None else 0
        C_curr = C * 2 ** d
        self.stem = _input_stem(in_channels, C_curr)
        self.layout = [f"{'adapter 1x1' if in_channels else 'conv stem 3x3'} -> {C_curr}"]
        self.drop_path_prob = 0.0  # NB201's recipe has no drop path
        cells = []
        for stage in range(d, 3):
            if stage > d:
                cells.append(ResNetBasicBlock(C_curr, 2 * C_curr))
                C_curr *= 2
                self.layout.append(f"resnet basic block /2 -> {C_curr}")
            cells += [NB201Cell(genotype, C_curr) for _ in range(N)]
            self.layout.append(f"stage {stage}: {N} cells C={C_curr}")
        self.cells = nn.Sequential(*cells)
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_curr), nn.ReLU())
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_curr, num_classes)

    def forward(self, x):
        out = self.lastact(self.cells(self.stem(x)))
        return self.classifier(self.global_pooling(out).flatten(1)), None


def build_network(genotype, num_classes: int, *, layers: int | None = None, channels: int | None = None,
                  auxiliary: bool = False, in_channels: int | None = None, in_size: int | None = None) -> nn.Module:
    """The evaluation network of a genotype (object or its JSON dict). ``layers``: DARTS cells in all (default 20),
    NB201 cells per stage (default 5); ``channels``: the reference network's first width (36 / 16).
    ``in_channels``/``in_size``: a frozen stem's features as input (None: the classic conv stem on images)."""
    if isinstance(genotype, dict):
        genotype = genotype_from_json(genotype)
    kind = "darts" if isinstance(genotype, DartsGenotype) else "nb201"
    layers = DEFAULTS[kind]["layers"] if layers is None else int(layers)
    channels = DEFAULTS[kind]["channels"] if channels is None else int(channels)
    if layers < 1 or channels < 1:
        raise KtnasError(f"--layers and --channels must be positive, got {layers} and {channels}")
    if kind == "darts":
        return NetworkDARTS(genotype, num_classes, layers, channels, auxiliary, in_channels, in_size)
    if auxiliary:
        raise KtnasError("NAS-Bench-201 networks have no auxiliary head: drop --auxiliary")
    return NetworkNB201(genotype, num_classes, layers, channels, in_channels, in_size)


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
    tmp = f"{path}.partial"
    torch.save(payload, tmp)
    os.replace(tmp, path)


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
    if d.get("format_version") != FORMAT_VERSION:
        raise KtnasError(f"{path}: ktnas model format {d.get('format_version')!r}, this version reads "
                         f"{FORMAT_VERSION}; retrain or export it again")
    try:
        s = d["stem"]
        stem = rebuild_stem(s["spec"], s["preprocessing"], s["state_dict"], s["weights"])
        net = build_network(d["genotype"], **d["network_config"])
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
