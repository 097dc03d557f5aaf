"""The feature store's commands: ``ktnas stems``, ``ktnas precompute-features`` and ``ktnas inspect`` (the engine's
``ktnas`` command adds them with :func:`register_store_commands`)."""
from __future__ import annotations

import json
import sys

from .flags import add_config_arguments, config_from_args, format_bytes


def cmd_stems(args) -> int:
    from .stems import list_stems

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
    from .precompute import PrecomputeConfig, precompute

    s = precompute(config_from_args(PrecomputeConfig, args))
    rate = f", {s['images_per_s']:.0f} images/s" if s.get("images_per_s") else ""
    state = "complete" if s["complete"] else "not complete yet (other shards still writing)"
    print(f"{s['out']}: wrote {s['chunks_written']} chunks ({s['images']} images) in {s['seconds']:.1f} s{rate}, "
          f"skipped {s['chunks_skipped']} already written; store {state}")
    return 0


def cmd_inspect(args) -> int:
    from .store import inspect_store

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
    from .precompute import PrecomputeConfig
    from .stems import DEFAULT_IMAGE_SIZE

    s = sub.add_parser("stems", help="list the stems (ARCH:CUT) with output channels and stride")
    s.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="show feature sizes at this size")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stems)

    s = sub.add_parser("precompute-features", help="run a frozen stem over a data set into a feature store")
    add_config_arguments(s, PrecomputeConfig, skip=("extra",))
    s.set_defaults(func=cmd_precompute)

    s = sub.add_parser("inspect", help="metadata, shapes, completeness and size of a feature store")
    s.add_argument("store")
    s.add_argument("--verify", action="store_true", help="read every chunk; check it decodes, finiteness, labels")
    s.add_argument("--repair", action="store_true", help="verify, and flag bad chunks unwritten for --resume")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_inspect)
