"""``ktnas search``: differentiable / one-shot architecture search on cached stem features (or raw images).

One Python call, :func:`search` (``SearchConfig`` -> summary dict); the CLI's flags are generated from the config.
The algorithms are ``ktnas.engine.algorithms``' modules, the spaces ``ktnas.engine.spaces``'; this module is the
loop: data, process group, resume, files. docs/guides/search.md documents the run directory and the flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import resolve_device
from ktnas.kernels import first_use_failures, observe_dispatch, resolve_impl
from ktnas.kernels.mixed import describe

from ktnas.engine import distributed
from ktnas.engine.algorithms import ALGORITHMS, get_algorithm
from ktnas.engine.search.capture import CAPTURE, check_capture, resolve_capture
from ktnas.engine.data import search_data
from ktnas.cache.flags import (add_config_arguments, check_positive, comma_tuple, config_from_args, format_bytes,
                               option, parse_size, peek_flag)
from ktnas.engine.search.memory import choose_batch_size
from ktnas.engine.plots import plot_alphas
from ktnas.engine.runs import RunDir, peak_memory, seed_all, set_rng_state
from ktnas.engine.search.run import SearchRun
from ktnas.engine.search import budget, choice, schedule
from ktnas.engine.search.budget import parse_budget
from ktnas.engine.search.schedule import SCHEDULES
from ktnas.engine.spaces import SPACES, count_skips, genotype_str, get_space, load_genotype
from ktnas.engine.search.supernet import RECOMPUTE, count_parameters


@dataclass
class SearchConfig:
    """Everything ``ktnas search`` takes. ``None`` means: the algorithm's paper default (its ``defaults``), or
    for the layout, the paper's search network minus the cells the stem replaces (``ktnas.engine.layout``).
    ``options``: the algorithm's own options by name (its ``Options`` dataclass; the missing ones take its
    defaults), e.g. ``{"order": 2}`` for DARTS, ``{"pc_k": 2}`` for PC-DARTS."""
    features: str | None = option(None, "feature store (from precompute-features)")
    out: str = option("runs/search", "run directory", required=True)
    space: str = option("darts", "search space")
    algo: str = option("darts", "search algorithm; `ktnas search --algo NAME --help` shows its own options and "
                                "defaults")
    stem: str = option("features", "features: the store's frozen stem (KT-NAS); none: classic conv stem on "
                                   "--dataset images", choices=("features", "none"))
    dataset: str | None = option(None, "with --stem none: fashion-mnist, cifar10, synthetic:TRAIN/TEST, ...")
    data_root: str | None = option(None, "folder with the data set's files")
    image_size: int = option(32, "--stem none, imagefolder sets only")
    epochs: int | None = option(None, "search epochs")
    batch_size: int | None = option(None, "batch size (per rank under torchrun)")
    lr: float | None = option(None, "weight learning rate (cosine to --lr-min)")
    lr_min: float | None = option(None, "final weight learning rate")
    momentum: float = option(0.9, "SGD momentum of the weights")
    weight_decay: float | None = option(None, "weight decay of the weights")
    nesterov: bool | None = None
    grad_clip: float = option(5.0, "gradient norm clip of the weights")
    arch_lr: float | None = option(None, "Adam learning rate of the architecture parameters (at the paper's "
                                         "budget: a short-budget schedule scales it, see --schedule)")
    arch_weight_decay: float = option(1e-3, "Adam weight decay of the architecture parameters")
    arch_betas: tuple[float, float] = (0.5, 0.999)
    layers: int | None = option(None, "cells the supernet is built with (NB201: its ResNet blocks included); "
                                      "default: the paper's 8 (NB201 17) minus what the stem replaces")
    channels: int | None = option(None, "width of the first cells (default: 16, doubled per stage the stem replaces)")
    reductions: tuple[int, ...] | None = option(None, "comma-separated reduction positions among --layers ('' for "
                                                      "none)")
    train_portion: float = option(0.5, "share of the train split that trains the weights; the rest trains the "
                                       "architecture")
    seed: int = option(0, "seed of the initialisation, the split and the batch order")
    device: str = option("auto", "auto | cpu | cuda")
    precision: str = option("fp32", choices=("fp32", "bf16"))
    kernels: str = option("auto", choices=("auto", "triton", "torch"))
    recompute: str = option("auto", "what backward recomputes instead of keeping: edge (each mixed edge keeps only "
                                    "its input), cell, none; auto: edge for the KT-NAS supernet on CUDA, none on the "
                                    "CPU and for --stem none (classic DARTS)", choices=("auto", "none", "edge", "cell"))
    capture: str = option("auto", "how the step runs: graph (one CUDA graph per step, CUDA), compile (torch.compile, "
                                  "any device), none (eager); auto: graph on one CUDA device where the algorithm "
                                  "allows, else none", choices=CAPTURE)
    compile_backend: str = option("inductor", "with --capture compile: torch.compile's backend (inductor; aot_eager "
                                              "compiles fast and fuses nothing)")
    resume: bool = option(False, "continue the run in --out")
    limit: int | None = option(None, "first N samples of the train split only")
    max_memory: int | str | None = option(None, "the largest batch size up to --batch-size whose search step peaks "
                                                "within SIZE (e.g. 2GiB, 1500MiB, 8GB, bytes), by the step profile "
                                                "(CUDA: confirmed by a trial step)", metavar="SIZE", type=str)
    progress: bool = option(True, "no progress bars", flag="quiet")
    schedule: str = option("auto", "how the architecture parameters learn at this budget: paper (the paper's "
                                   "rates as given), short (the weights alone for the first quarter of the epochs, "
                                   "then the alphas at the paper's rate x its architecture steps / this run's, at "
                                   "most 0.1), auto (short when the run has under a tenth of the paper's "
                                   "architecture steps)", choices=SCHEDULES)
    budget: str | None = option(None, "the found model's cost at most this: params=1.5M,flops=300M,latency=4ms (any "
                                      "of them; the frozen stem and the network ktnas train builds at "
                                      "--train-layers/--train-channels; latency as --latency-table predicts it)",
                                metavar="KEY=VALUE,...")
    train_layers: int | None = option(None, "with --budget: the cells of the network the found genotype will be "
                                            "trained in (ktnas train --layers; default: its default)")
    train_channels: int | None = option(None, "with --budget: its first cells' width (ktnas train --channels)")
    latency_table: str | None = option(None, "with --budget latency=...: the table of `ktnas bench latency` for "
                                             "that network (default: measured now on the CPU with onnxruntime, "
                                             "batch 1)", metavar="FILE")
    options: dict = field(default_factory=dict)


# a resumed run may change these (how the step runs, not what it computes: recompute and capture give the same
# values and gradients, tested)
NOT_COMPARED = ("resume", "progress", "device", "kernels", "out", "max_memory", "recompute", "capture",
                "compile_backend")


def resolve_config(cfg: SearchConfig) -> SearchConfig:
    """A copy of ``cfg`` with the paper defaults filled in and the values checked (one-line KtnasError)."""
    cfg = dataclasses.replace(cfg)
    get_space(cfg.space)
    algo = get_algorithm(cfg.algo)
    opts = algo.options(cfg.options)
    if cfg.stem not in ("features", "none"):
        raise KtnasError(f"unknown --stem {cfg.stem!r}: use 'features' (a store's cached features) or 'none'")
    if cfg.stem == "features" and not cfg.features:
        raise KtnasError("no feature store given: pass --features STORE (or --stem none --dataset D)")
    if cfg.stem == "none" and not cfg.dataset:
        raise KtnasError("--stem none searches on raw images: pass --dataset D")
    if cfg.precision not in ("fp32", "bf16"):
        raise KtnasError(f"unknown --precision {cfg.precision!r}: use fp32 or bf16")
    for k, v in algo.defaults.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    check_positive(cfg, ("epochs", "batch_size"))
    algo.resolve(cfg, opts)
    cfg.options = dataclasses.asdict(opts)
    if cfg.limit is not None and cfg.limit < 2:
        raise KtnasError("--limit must be at least 2 (one search-train and one search-validation sample)")
    if not 0 < cfg.train_portion < 1:
        raise KtnasError(f"--train-portion must lie strictly between 0 and 1, got {cfg.train_portion}")
    if cfg.reductions is not None:
        cfg.reductions = tuple(int(r) for r in cfg.reductions)
    if cfg.max_memory is not None:
        cfg.max_memory = parse_size(cfg.max_memory)
    parse_budget(cfg.budget)  # a malformed budget is refused before anything runs
    if cfg.recompute not in ("auto", *RECOMPUTE):
        raise KtnasError(f"unknown --recompute {cfg.recompute!r}: use auto, {', '.join(RECOMPUTE)}")
    if cfg.recompute == "auto":
        cfg.recompute = default_recompute(cfg.stem, cfg.device)
    check_capture(cfg.capture)
    if cfg.schedule not in SCHEDULES:
        raise KtnasError(f"unknown --schedule {cfg.schedule!r}: use one of {', '.join(SCHEDULES)}")
    cfg.arch_betas = tuple(cfg.arch_betas)
    return cfg


def default_recompute(stem: str, device: str) -> str:
    """``--recompute auto``, chosen by the measurements (docs/guides/small-gpus.md, "What each lever does"):
    ``edge`` for the KT-NAS supernet on CUDA (a step of 1/42 of the classic one's memory), ``none`` on the CPU
    (recomputing costs 38% step time there, where memory is plentiful) and for ``--stem none`` (classic DARTS as
    its authors run it)."""
    on_cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "edge" if stem != "none" and on_cuda else "none"


def config_json(cfg: SearchConfig) -> dict:
    d = asdict(cfg)
    d["arch_betas"] = list(cfg.arch_betas)
    d["reductions"] = None if cfg.reductions is None else list(cfg.reductions)
    return d


# ---------------------------------------------------------------------------------------------------- search
def search(cfg: SearchConfig | None = None, **overrides) -> dict:
    """Run the configured search; returns a summary: out, genotype (JSON form), genotype_str, epochs, the last
    epoch's metrics, layout and parameter counts. Under torchrun every rank calls it (docs/guides/search.md, "Data
    parallel") and gets the same summary; only rank 0 writes."""
    cfg = resolve_config(dataclasses.replace(cfg or SearchConfig(), **overrides))
    device, rank, world_size, created = distributed.init_distributed(resolve_device(cfg.device))
    try:
        return _search(cfg, device, rank, world_size)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _batch_size(cfg, state, device, info, main: bool) -> int | None:
    """``--max-memory``: the batch size to search with (a resumed run keeps its own); None without the flag."""
    if cfg.max_memory is None:
        return None
    if state is not None:
        chosen, how = int(state["config"]["batch_size"]), "the resumed run's"
    else:
        pick = choose_batch_size(cfg, device, info)
        chosen = pick.batch
        how = (f"largest fitting: {format_bytes(pick.peak)} by the step profile, {format_bytes(pick.per_sample)} "
               f"per sample" + ("; confirmed by a CUDA trial step" if pick.confirmed else ""))
        seed_all(cfg.seed)  # the profile and the trials drew from the global generators
    if main:
        print(f"ktnas search: --max-memory {format_bytes(cfg.max_memory)}: batch size {chosen} per rank ({how}; "
              f"asked for {cfg.batch_size})", file=sys.stderr)
    return chosen


def _search(cfg: SearchConfig, device, rank: int, world_size: int) -> dict:
    cfg = dataclasses.replace(cfg, progress=cfg.progress and rank == 0,  # auto resolved: the profile needs it
                              capture=resolve_capture(cfg.capture, get_algorithm(cfg.algo), device, world_size))
    files = RunDir(cfg.out, "search", resume=cfg.resume, main=rank == 0, ignore=NOT_COMPARED)
    state = distributed.from_rank0(files.read_checkpoint)
    seed_all(cfg.seed)
    info, make_loaders = search_data(cfg, device, rank, world_size)
    chosen = _batch_size(cfg, state, device, info, rank == 0)
    if chosen is not None:
        cfg = dataclasses.replace(cfg, batch_size=chosen)
    train, val = make_loaders(cfg.batch_size)
    if state is not None and "schedule" not in state["config"]:
        cfg = dataclasses.replace(cfg, schedule="paper")  # a run from before --schedule ran the papers' rates
    cfg, plan = schedule.plan(cfg, get_algorithm(cfg.algo), len(train))
    if rank == 0:
        print(f"ktnas search: {schedule.describe(plan)}", file=sys.stderr)
    try:
        run = SearchRun(cfg, device, info, ddp=world_size > 1)
        start, history, alpha_hist = 0, [], {}
        if state is not None:
            files.check_config(state["config"], config_json(cfg))
            run.load_state_dict(state)
            set_rng_state(state["rng"])
            start, history = state["epoch"], state["history"]
            alpha_hist = {k: v.cpu().numpy() for k, v in state["alpha_hist"].items()}
        distributed.broadcast_model(run.model)
        resolved = dict(config_json(cfg), layout=run.layout, data=info, world_size=world_size,
                        effective_batch_size=cfg.batch_size * world_size, params=count_parameters(run.model),
                        arch_params=sum(p.numel() for p in run.model.arch_parameters()),
                        kernels_used=resolve_impl(cfg.kernels, device), capture_used=run.capture,
                        schedule_used=plan)
        if chosen is not None:
            resolved["batch_size_chosen"] = chosen
        files.write_json("config.json", resolved)
        genotype = None
        for epoch in range(start, cfg.epochs):
            genotype = _epoch(run, files, epoch, train, val, history, alpha_hist, world_size)
            files.write_json("config.json", dict(resolved, ran={k: history[-1][k] for k in RAN}))
        if files.main and history and not history[-1]["choice_supported"]:
            arch_steps = sum(r["steps"].get("called", 0) for r in history if r["epoch"] > run.arch_start)
            warnings.warn(choice.unsupported_warning(run.model.space, history[-1], arch_steps),
                          choice.UnsupportedChoice)
        if genotype is None:  # resumed after the last epoch: the files are there already
            genotype = distributed.from_rank0(lambda: load_genotype(files.file("genotype.json")))
        if files.main:
            plot_alphas(alpha_hist, run.model.space.ops, files.file("alphas.png"))
            run.model.space.draw(genotype, files.path)
        return dict(out=str(files.path), genotype=genotype.to_json(), genotype_str=genotype_str(genotype),
                    rank=rank, world_size=world_size, epochs=cfg.epochs, last=history[-1] if history else None,
                    space=cfg.space,
                    layout=run.layout, params=resolved["params"], arch_params=resolved["arch_params"])
    finally:
        train.close()
        val.close()
        if getattr(train, "store", None) is not None:  # both loaders share the store search_data opened
            train.store.close()


def _epoch(run: SearchRun, files: RunDir, epoch: int, train, val, history: list, alpha_hist: dict, world_size):
    """One epoch: train, evaluate, the genotype, the metrics record, the files and the checkpoint."""
    import torch

    cfg, model, algorithm, device = run.cfg, run.model, run.algorithm, run.device
    train.set_epoch(epoch)
    val.set_epoch(epoch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    rec = dict(epoch=epoch + 1, lr=run.lr(), **algorithm.epoch_info(epoch))
    with observe_dispatch() as dispatched:
        rec.update(run.train_epoch(epoch, train, val))
        model.eval()
        rec.update(run.evaluate(val, algorithm.eval_arch(epoch)))
    rec["kernels"] = kernels_record(dispatched)
    rec["eval"] = run.eval_report
    run.sched.step()
    genotype, extra = algorithm.genotype(epoch, val, files)
    rec.update(extra)
    if run.budget is not None and genotype is not None:  # within the budget, and the penalty raised when over
        genotype, rec["budget"] = run.budget.constrain(genotype, budget.derivation_weights(model))
    rec["seconds"] = time.perf_counter() - t0
    rec["peak_memory_bytes"] = -distributed.min_over_ranks(-peak_memory(device), device)  # the largest rank's
    rec.update(choice.movement(model.space, model.alphas()))  # entropy, entropy_ratio, margins, margin_median
    rec["choice_supported"] = choice.supported(model.space, rec)
    rec["skips"] = None if genotype is None else count_skips(genotype)
    rec["genotype"] = None if genotype is None else genotype_str(genotype)
    rec["world_size"] = world_size
    rec["rank_alpha_hashes"] = distributed.check_ranks_agree(model, genotype, epoch)
    history.append(rec)
    for t, a in model.alphas().items():
        alpha_hist[f"{t}_e{epoch:03d}"] = a.detach().float().cpu().numpy().copy()
    files.write_jsonl("metrics.jsonl", history)
    files.save_npz("alphas.npz", alpha_hist)
    if genotype is not None:
        files.write("genotype.json", genotype.save)
    files.save_checkpoint(dict(run.state_dict(), epoch=epoch + 1, history=history,
                               alpha_hist={k: torch.from_numpy(v) for k, v in alpha_hist.items()}),
                          config_json(cfg))
    if cfg.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train {rec['train_loss']:.3f}/{rec['train_acc']:.3f} "
                   f"val {rec['val_loss']:.3f}/{rec['val_acc']:.3f} skips {rec['skips']} "
                   f"entropy {' '.join(f'{v:.3f}' for v in rec['entropy'].values())} (of max "
                   f"{' '.join(f'{v:.1%}' for v in rec['entropy_ratio'].values())}), median margin "
                   f"{' '.join(f'{v:.4f}' for v in rec['margin_median'].values())}\n  {rec['genotype']}",
                   file=sys.stderr)
    return genotype


RAN = ("epoch", "kernels", "steps", "eval")  # what the last epoch ran, repeated in config.json


def kernels_record(dispatched: dict) -> dict:
    """What ran on the mixed edges: the number of specialisations on the fused kernels and on the reference,
    and, for each one that fell back from the kernels, where and why."""
    failures = first_use_failures()
    impls = list(dispatched.values())
    return dict(triton=impls.count("triton"), torch=impls.count("torch"),
                fell_back={describe(spec): failures[spec] for spec in dispatched if spec in failures})


# ------------------------------------------------------------------------------------------------------- CLI
OPTION_DEST = "algo_option."  # the parsed namespace's prefix of the algorithm's own options


def cmd_search(args) -> int:
    """``ktnas search``: the flags as a SearchConfig (the algorithm's own ones as its ``options``), then
    :func:`search`."""
    given = {k[len(OPTION_DEST):]: v for k, v in vars(args).items() if k.startswith(OPTION_DEST) and v is not None}
    s = search(config_from_args(SearchConfig, args, options=given))  # another algorithm's option: refused there
    last = s["last"] or {}
    if s["rank"] == 0:
        print(f"{s['out']}: {s['epochs']} epochs, val acc {last.get('val_acc', float('nan')):.4f}, "
              f"{s['params'] / 1e6:.3f} M params; genotype {s['genotype_str']}")
        if "margin_median" in last:
            print(f"architecture weights: {choice.describe(get_space(s['space']), last)}; the choice is "
                  f"{'supported' if last['choice_supported'] else 'NOT supported'} by them")
    return 0


def _option_help(f: dataclasses.Field) -> str:
    """An algorithm option's help with its default (the flag's own default is None: "not given")."""
    text = f.metadata.get("help", "")
    if "default" in text or f.default is None or f.default is dataclasses.MISSING:
        return text
    return f"{text} (default: {f.default})"


def add_search_parser(subparsers, argv=None) -> None:
    """Add the ``search`` subcommand (``func=cmd_search``) to an argparse subparsers object. The algorithm named
    by ``--algo`` in ``argv`` (default: the command line; else DARTS) shows its own options and its paper's
    defaults in the help; the other algorithms' options are refused in one line."""
    named = peek_flag(sys.argv[1:] if argv is None else argv, "algo", SearchConfig.algo)
    algo = ALGORITHMS.get(named, ALGORITHMS[SearchConfig.algo])  # an unknown name: --algo's choices refuse it
    s = subparsers.add_parser("search", help="architecture search on a feature store (or raw images: --stem none)",
                              description="Search a cell on cached stem features. Unset hyper-parameters take the "
                                          f"algorithm's paper defaults; shown: --algo {algo.name}'s.")
    paper = {f.name: dict(help=f"{f.metadata['help']} (default for {algo.name}: {algo.defaults[f.name]})")
             for f in dataclasses.fields(SearchConfig) if f.name in algo.defaults and "help" in f.metadata}
    add_config_arguments(s, SearchConfig, skip=("arch_betas", "nesterov", "image_size", "options"),
                         overrides=dict(paper, reductions=dict(type=comma_tuple(int)),
                                        space=dict(choices=tuple(SPACES)),
                                        algo=dict(choices=tuple(ALGORITHMS))))  # those registered by now
    own = s.add_argument_group(f"options of --algo {algo.name}")
    flag = {f.name: f.type not in (bool, "bool") for f in dataclasses.fields(algo.Options)}  # bools: on/off flags
    shown = {f.name: dict(dest=OPTION_DEST + f.name, help=_option_help(f),
                          **({"default": None} if flag[f.name] else {}),
                          **({"metavar": f.name.upper()} if flag[f.name] and "choices" not in f.metadata else {}))
             for f in dataclasses.fields(algo.Options)}
    add_config_arguments(own, algo.Options, overrides=shown)
    for name in sorted({f.name for a in ALGORITHMS.values() for f in dataclasses.fields(a.Options)}
                       - set(algo.Options.__dataclass_fields__)):
        s.add_argument("--" + name.replace("_", "-"), dest=OPTION_DEST + name, default=None, nargs="?",
                       const=True, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_search)
