"""``ktnas rank``: zero-cost proxy scores of architectures, without training them.

Each architecture (from ``--genotypes FILE`` or ``--sample N`` drawn with ``--seed``) is built as ``ktnas evolve``
builds its candidates (the evaluation network at the space's proxy size on the store's cached features, or with
``--stem none`` the whole network with its own conv stem on the store's images), its weights initialised from a
seed of (seed, index), and scored by every ``--proxy`` on the first ``--batches`` minibatches of a seeded
permutation of the store's train split (the same batches for every architecture). Scores and seconds per
architecture are appended to ``scores.jsonl`` as they are computed (a rerun with ``--resume`` scores only what is
missing, to the same values), and written to ``scores.csv``. Deterministic for a seed (tested).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ktnas.cache.errors import KtnasError
from ktnas.cache.flags import add_config_arguments, config_from_args, option

from ktnas.engine.rank.proxies import PROXIES, score
from ktnas.engine.spaces import SPACES, distinct_genotypes, genotype_from_json, genotype_str, get_space, space_of

BASELINES = ("params", "flops")
DEFAULT_PROXIES = "synflow,snip,grad_norm,jacov,naswot,zico,params,flops"


@dataclass
class RankConfig:
    """Everything ``ktnas rank`` takes."""

    features: str | None = option(None, "feature store (from precompute-features)")
    out: str = option("runs/rank", "output folder (scores.jsonl, scores.csv, config.json)", required=True)
    space: str = option("nb201", "search space")
    genotypes: str | None = option(None, "a file of genotypes: a JSON list, JSON lines (ktnas evolve's "
                                         "candidates.jsonl included), or one genotype text per line", metavar="FILE")
    sample: int | None = option(None, "N architectures drawn uniformly (distinct) with --seed instead")
    proxy: str = option(DEFAULT_PROXIES, "comma-separated proxies")
    batches: int = option(2, "minibatches each proxy reads (zico at least 2; the others the first)")
    batch_size: int = option(64, "samples per minibatch")
    stem: str = option("features", "features: the cells on the store's cached features; none: the whole network "
                                   "with its own conv stem on the store's images", choices=("features", "none"))
    layers: int | None = option(None, "cells built (default: the space's proxy network, as ktnas evolve)")
    channels: int | None = option(None, "width of the first cells")
    seed: int = option(0, "seed of the sampled architectures, the weights and the batches")
    data_root: str | None = option(None, "with --stem none: folder with the data set's files")
    device: str = option("cpu", "auto | cpu | cuda")
    resume: bool = option(False, "continue the scores in --out")
    progress: bool = option(True, "no progress bars", flag="quiet")


def proxies_of(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROXIES and n not in BASELINES]
    if not names or unknown:
        raise KtnasError(f"--proxy {text!r}: unknown {', '.join(unknown) or 'empty list'}; use any of "
                         f"{', '.join([*PROXIES, *BASELINES])}")
    return names


def read_genotypes(path, space) -> list:
    """The genotypes of ``path``: a JSON list (of genotypes or of rows with a "genotype"), JSON lines, or one
    genotype text per line (any form ``ktnas genotype show`` reads); one-line KtnasError otherwise."""
    from ktnas.engine.genotypes import parse_genotype

    p = Path(path)
    if not p.is_file():
        raise KtnasError(f"--genotypes {path}: no such file")
    text = p.read_text()
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else data.get("genotypes", [data]) if isinstance(data, dict) else \
            [data]
    except ValueError:
        items = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        try:
            items = [json.loads(line) for line in items]
        except ValueError:
            pass
    out = []
    for k, item in enumerate(items):
        item = item.get("genotype", item) if isinstance(item, dict) else item
        try:
            g = genotype_from_json(item) if isinstance(item, dict) else parse_genotype(str(item))
        except KtnasError as e:
            raise KtnasError(f"--genotypes {path}: entry {k + 1}: {e}") from None
        if space_of(g) is not space:
            raise KtnasError(f"--genotypes {path}: entry {k + 1} is a {space_of(g).name} genotype, not {space.name}: "
                             f"pass --space {space_of(g).name}")
        out.append(g)
    if not out:
        raise KtnasError(f"--genotypes {path}: no genotype in it")
    return out


def rank_batches(cfg: RankConfig, store, device, indices=None) -> tuple[list, dict]:
    """(the minibatches every architecture is scored on, the network's build arguments): the first
    ``batches * batch_size`` samples of a seeded permutation of the train split (of its ``indices`` when given), as
    cached features or (``--stem none``) as the store's images for the classic network."""
    from ktnas.cache.stream import FeatureLoader
    from ktnas.engine.data import classic_images
    from ktnas.engine.layout import resolve_layout

    space = get_space(cfg.space)
    sp = store.split("train")
    pick = np.arange(sp.shape[0]) if indices is None else np.asarray(indices)
    n = min(cfg.batches * cfg.batch_size, len(pick))
    idx = np.sort(pick[np.random.default_rng([cfg.seed, 41]).permutation(len(pick))[:n]])
    if cfg.stem == "none":
        x, y = classic_images(store, int(idx.max()) + 1, cfg.data_root)
        x, y = x[idx].float(), y[idx]
        resolution, in_channels = None, None
    else:
        loader = FeatureLoader(store, "train", batch_size=n, shuffle=False, indices=idx, view=0, device="cpu",
                               workers=1)
        try:
            x, y = next(iter(loader))
        finally:
            loader.close()
        resolution, in_channels = int(x.shape[-1]), int(x.shape[1])
    batches = [(x[k:k + cfg.batch_size].to(device), y[k:k + cfg.batch_size].to(device))
               for k in range(0, n, cfg.batch_size)]
    layout = resolve_layout(space, resolution, "eval", layers=cfg.layers, channels=cfg.channels,
                            reference=space.proxy)
    build = dict(num_classes=int(store.attrs.get("num_classes") or int(y.max()) + 1), **layout.as_dict(),
                 in_channels=in_channels, in_size=resolution)
    return batches, build


def score_architecture(genotype, index: int, cfg: RankConfig, names, batches, build, device) -> dict:
    """Every proxy of ``names`` for one architecture: {arch, genotype, scores, seconds}."""
    from ktnas.engine.evolve.predictor import TAG_INIT, derive_seed
    from ktnas.engine.profile.cost import count
    from ktnas.engine.train.network import build_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, index, TAG_INIT))
        net = build_network(genotype, **build).to(device)
    scores, seconds = {}, {}
    for name in names:
        t = time.perf_counter()
        if name == "params":
            value = sum(p.numel() for p in net.parameters())
        elif name == "flops":  # multiply-adds of one sample, as the NAS papers count FLOPs
            value = count(net, batches[0][0][:1])[1]
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(cfg.seed, index, TAG_INIT) + 1)  # dropout-free, but set all the same
                value = score(name, net, batches)
        scores[name], seconds[name] = float(value), time.perf_counter() - t
    return dict(index=index, arch=genotype_str(genotype), genotype=genotype.to_json(), scores=scores,
                seconds=seconds)


def rank(cfg: RankConfig | None = None, **overrides) -> dict:
    """Score the configured architectures; returns the summary ``config.json`` holds with the rows."""
    from ktnas.cache.runtime import resolve_device
    from ktnas.cache.store import open_store
    from ktnas.engine.runs import progress, read_jsonl

    cfg = dataclasses.replace(cfg or RankConfig(), **overrides)
    space = get_space(cfg.space)
    names = proxies_of(cfg.proxy)
    for k in ("batches", "batch_size"):
        if getattr(cfg, k) < 1:
            raise KtnasError(f"--{k.replace('_', '-')} must be at least 1")
    if "zico" in names and cfg.batches < 2:
        raise KtnasError("zico reads the gradients' spread over minibatches: pass --batches 2 or more")
    if (cfg.genotypes is None) == (cfg.sample is None):
        raise KtnasError("say which architectures: pass --genotypes FILE or --sample N")
    if not cfg.features:
        raise KtnasError("no feature store given: pass --features STORE (made by ktnas precompute-features)")
    archs = read_genotypes(cfg.genotypes, space) if cfg.genotypes else distinct_genotypes(space, cfg.sample, cfg.seed)
    out = Path(cfg.out)
    log = out / "scores.jsonl"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "resume", "progress", "device")}
    if log.exists():
        if not cfg.resume:
            raise KtnasError(f"{out} already holds scores: pass --resume to go on with them, or another --out")
        old = json.loads((out / "config.json").read_text())["settings"]
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise KtnasError(f"{out} was scored with other settings ({', '.join(diff)}): resume with the same "
                             "arguments, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(settings=settings, architectures=len(archs)), indent=1))
    done = read_jsonl(log) if log.exists() else []
    device = resolve_device(cfg.device)
    with open_store(cfg.features) as store:
        batches, build = rank_batches(cfg, store, device)
        with open(log, "a") as f:
            for i in progress(range(len(done), len(archs)), desc="rank", enabled=cfg.progress):
                row = score_architecture(archs[i], i, cfg, names, batches, build, device)
                f.write(json.dumps(row) + "\n")
                f.flush()
                done.append(row)
    write_csv(out / "scores.csv", done, names)
    mean_s = {n: float(np.mean([r["seconds"][n] for r in done])) for n in names} if done else {}
    return dict(out=str(out), rows=done, proxies=names, network=build, seconds_per_architecture=mean_s)


def write_csv(path: Path, rows: list[dict], names) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "arch", *names, *(f"{n}_seconds" for n in names)])
        for r in rows:
            w.writerow([r["index"], r["arch"], *(repr(r["scores"][n]) for n in names),
                        *(f"{r['seconds'][n]:.4f}" for n in names)])


def cmd_rank(args) -> int:
    s = rank(config_from_args(RankConfig, args))
    per = ", ".join(f"{n} {1e3 * t:.1f} ms" for n, t in s["seconds_per_architecture"].items())
    print(f"{s['out']}: {len(s['rows'])} architectures scored ({s['out']}/scores.csv); per architecture: {per}")
    return 0


def add_rank_parser(subparsers):
    s = subparsers.add_parser("rank", help="zero-cost proxy scores of architectures (synflow, snip, grad_norm, "
                                           "jacov, naswot, zico, params, flops), no training",
                              description="Score architectures at initialisation with zero-cost proxies on cached "
                                          "stem features (or, with --stem none, on images).")
    add_config_arguments(s, RankConfig, overrides=dict(space=dict(choices=tuple(SPACES))))
    s.set_defaults(func=cmd_rank)
    return s
