"""The ``ktnas`` command. A thin layer: each subcommand maps its flags onto one documented Python call.

The engine's own subcommands are added here; any other package adds its own through an entry point of group
``ktnas.commands`` (``name = "package.module:register"``, ``register(subparsers)`` adding its subcommands with
``set_defaults(func=...)``), so the engine never imports them (``ktnas.bench`` is one: ``ktnas bench``).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from importlib.metadata import entry_points

from ktnas.cache.errors import KtnasError
from ktnas.engine.flags import format_bytes

COMMANDS_GROUP = "ktnas.commands"


# --------------------------------------------------------------------------------------------- commands
def cmd_stems(args) -> int:
    from ktnas.cache.stems import list_stems

    rows = list_stems()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    size = args.image_size
    print(f"{'stem':32s} {'channels':>8s} {'stride':>6s}  features at {size} px")
    for r in rows:
        h = -(-size // r["stride"])
        print(f"{r['spec']:32s} {r['channels']:8d} {r['stride']:6d}  {r['channels']}x{h}x{h}")
    return 0


def cmd_precompute(args) -> int:
    from ktnas.cache.precompute import PrecomputeConfig, parse_shard, precompute

    shard = parse_shard(args.shard) if args.shard else _torchrun_shard()
    cfg = PrecomputeConfig(dataset=args.dataset, stem=args.stem, weights=args.weights, image_size=args.image_size,
                           out=args.out, dtype=args.dtype, views=args.views,
                           splits=tuple(s for s in args.splits.split(",") if s), batch_size=args.batch_size,
                           device=args.device, chunk_size=args.chunk_size, compressor=args.compressor,
                           limit=args.limit, shard=shard, resume=args.resume, overwrite=args.overwrite,
                           seed=args.seed, data_root=args.data_root, progress=not args.quiet)
    s = precompute(cfg)
    rate = f", {s['images_per_s']:.0f} images/s" if s.get("images_per_s") else ""
    state = "complete" if s["complete"] else "not complete yet (other shards still writing)"
    print(f"{s['out']}: wrote {s['chunks_written']} chunks ({s['images']} images) in {s['seconds']:.1f} s{rate}, "
          f"skipped {s['chunks_skipped']} already written; store {state}")
    return 0


def _torchrun_shard() -> tuple[int, int]:
    """Under torchrun each rank takes its own shard."""
    import os

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def cmd_inspect(args) -> int:
    from ktnas.cache.store import inspect_store

    r = inspect_store(args.store, verify=args.verify or args.repair, repair=args.repair, progress=not args.quiet)
    if args.json:
        print(json.dumps(r, indent=1, default=str))
        return 0 if r.get("verified_ok", True) else 1
    a = r["attrs"]
    pre = a.get("preprocessing", {})
    print(f"store      {r['path']} ({r['backend']}, format {a.get('format_version')})")
    print(f"stem       {a.get('stem')}  weights {a.get('weights')}  fingerprint {str(a.get('stem_fingerprint'))[:16]}")
    print(f"preprocess image {pre.get('image_size')} px, mean {pre.get('mean')}, std {pre.get('std')}")
    print(f"dataset    {a.get('dataset')} ({a.get('num_classes')} classes), views {a.get('views')}, "
          f"dtype {a.get('dtype')}, compressor {a.get('compressor')}, chunk {a.get('chunk_size')} samples")
    print(f"complete   {r['complete']}")
    print(f"on disk    {format_bytes(r['size_on_disk'])}")
    print(f"read with  {r['read_without_ktnas']}")
    for name, s in r["splits"].items():
        ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "-"
        print(f"  {name:6s} features {s['shape']} {s['dtype']}  chunks {s['chunks_written']}/{s['chunks']}  "
              f"raw {format_bytes(s['nbytes'])}, stored {format_bytes(s['stored_bytes'])} (compression {ratio})")
        if "bad_chunks" in s:
            bad = s["bad_chunks"]
            print(f"         verify: {'ok' if not bad else f'{len(bad)} bad chunks: ' + str(bad)}")
    if r.get("verified_ok") is False:
        fix = ("they are flagged unwritten now: rerun the store's precompute command with --resume" if args.repair
               else "run again with --repair, then rerun the store's precompute command with --resume")
        print(f"verify failed: {fix}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ parser
def register_store_commands(sub) -> None:
    """Add ``stems``, ``precompute-features`` and ``inspect`` to the ``ktnas`` subparsers ``sub``."""
    from ktnas.cache.datasets import DATASETS
    from ktnas.cache.precompute import PrecomputeConfig
    from ktnas.cache.runtime import DEFAULT_OUT
    from ktnas.cache.stems import DEFAULT_IMAGE_SIZE, DEFAULT_STEM
    from ktnas.cache.store import COMPRESSORS

    d = PrecomputeConfig()
    s = sub.add_parser("stems", help="list the stems (ARCH:CUT) with output channels and stride")
    s.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="show feature sizes at this size")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stems)

    s = sub.add_parser("precompute-features", help="run a frozen stem over a data set into a feature store")
    s.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)} (default: %(default)s)")
    s.add_argument("--data-root", default=None, help="folder with the data set's files (default: the usual places)")
    s.add_argument("--stem", default=DEFAULT_STEM, help="ARCH:CUT, see `ktnas stems` (default: %(default)s)")
    s.add_argument("--weights", default=d.weights, help="imagenet | none | PATH to a state dict (default: imagenet)")
    s.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="stem input size (default: %(default)s)")
    s.add_argument("--out", default=DEFAULT_OUT, help="store path: .zarr (default backend) or .h5 (default: "
                                                      "%(default)s)")
    s.add_argument("--dtype", default=d.dtype, choices=("float16", "float32"))
    s.add_argument("--views", type=int, default=d.views, help="views per image: 0 plain, others crop+flip")
    s.add_argument("--splits", default=",".join(d.splits), help="comma-separated (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=None, help="stem batch (default: 64 on CPU, 256 on CUDA)")
    s.add_argument("--device", default=d.device, help="auto | cpu | cuda (default: auto)")
    s.add_argument("--chunk-size", type=int, default=None, help="samples per chunk (default: ~8 MiB chunks)")
    s.add_argument("--compressor", default=None, choices=COMPRESSORS,
                   help="zstd | gzip | lzf | none (default: zstd for .zarr; gzip, i.e. deflate + shuffle, for .h5, "
                        "which every HDF5 tool reads; zstd there needs hdf5plugin; lzf: HDF5 only)")
    s.add_argument("--limit", type=int, default=None, help="first N samples of each split only")
    s.add_argument("--shard", default=None, help="I/N: this process writes every N-th chunk from I "
                                                 "(default under torchrun: RANK/WORLD_SIZE)")
    s.add_argument("--seed", type=int, default=d.seed, help="seed of the augmented views")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted store")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_precompute)

    s = sub.add_parser("inspect", help="metadata, shapes, completeness and size of a feature store")
    s.add_argument("store")
    s.add_argument("--verify", action="store_true", help="read every chunk; check it decodes, finiteness, labels")
    s.add_argument("--repair", action="store_true", help="verify, and flag bad chunks unwritten for --resume")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_inspect)


def register_engine_commands(sub, argv=None) -> None:
    """Add ``search``, ``train``, ``evaluate``, ``evolve``, ``genotype``, ``predict``, ``export`` and ``doctor`` to
    the ``ktnas`` subparsers ``sub``; ``argv``: the command line (default ``sys.argv[1:]``), whose ``--algo``
    decides which algorithm's options ``search`` shows."""
    from ktnas.engine.doctor import add_doctor_parser
    from ktnas.engine.evolve import add_evolve_parser
    from ktnas.engine.export import add_export_parser
    from ktnas.engine.genotypes import add_genotype_parser
    from ktnas.engine.predict import add_predict_parser
    from ktnas.engine.search import add_search_parser
    from ktnas.engine.train import add_evaluate_parser, add_train_parser

    add_search_parser(sub, argv)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_evolve_parser(sub)
    add_genotype_parser(sub)
    add_predict_parser(sub)
    add_export_parser(sub)
    add_doctor_parser(sub)


def register_plugin_commands(sub) -> None:
    """Add the subcommands of every ``ktnas.commands`` entry point, in the order of their names. A plug-in that
    fails to load is left out with a one-line warning (the other commands still work)."""
    seen = set()
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if ep.name in seen:
            continue
        seen.add(ep.name)
        try:
            ep.load()(sub)
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not take the whole command down
            print(f"ktnas: warning: command plug-in {ep.name!r} ({ep.value}) not loaded: {type(e).__name__}: {e}",
                  file=sys.stderr)


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The ``ktnas`` parser for the command line ``argv`` (default ``sys.argv[1:]``), after loading the plug-ins
    (``ktnas.engine.plugins``), whose spaces and algorithms it offers."""
    from ktnas.engine.plugins import load_plugins

    load_plugins()
    p = argparse.ArgumentParser(prog="ktnas", description="Fast, memory-lean NAS by knowledge transfer from frozen "
                                                          "pretrained stems.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_store_commands(sub)
    register_engine_commands(sub, argv)
    register_plugin_commands(sub)
    return p


def one_line_errors() -> tuple[type[BaseException], ...]:
    """The errors ``ktnas`` prints as ``ktnas: error: ...`` (exit 2): KtnasError, and ktnas.kernels' KernelError.
    KernelError is looked up among the loaded modules: a kernel that raised it has loaded them, and the command
    does not import the kernels (and torch) just to name it."""
    errors = [KtnasError]
    for name in ("ktnas.kernels.errors", "ktnas.kernels"):
        kernel_error = getattr(sys.modules.get(name), "KernelError", None)
        if isinstance(kernel_error, type) and kernel_error not in errors:
            errors.append(kernel_error)
    return tuple(errors)


def main(argv=None) -> int:
    try:
        parser = build_parser(argv)
    except KtnasError as e:  # a plug-in that cannot be loaded
        print(f"ktnas: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    fmt = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.formatwarning = lambda msg, cat, *a, **k: f"ktnas: warning: {msg}\n"
        try:
            return int(args.func(args) or 0)
        except Exception as e:
            if not isinstance(e, one_line_errors()):
                raise
            print(f"ktnas: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("ktnas: interrupted", file=sys.stderr)
            return 130
        finally:
            warnings.formatwarning = fmt


if __name__ == "__main__":
    sys.exit(main())
