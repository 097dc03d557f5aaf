"""``ktnas export``: an exported model (``model.pt``: the frozen stem, its preprocessing and the trained cells)
written as one ONNX or TorchScript model that runs on raw images, any batch size, for deployment runtimes."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ktnas.cache.errors import KtnasError

from ktnas.engine.data import image_shape
from ktnas.engine.profile.cost import model_cost
from ktnas.engine.train.network import load_model
from ktnas.engine.train.onnx_file import write_onnx

FORMATS = ("onnx", "torchscript")


def input_shape(net, shape=None) -> tuple[int, int, int]:
    """The raw image shape (C, H, W) the export takes: ``shape`` (e.g. "1,28,28"), or that of the first test image
    of the model's data set."""
    if shape:
        try:
            c, h, w = (int(v) for v in str(shape).split(","))
        except ValueError:
            raise KtnasError(f"--input-shape {shape!r}: give C,H,W, e.g. 1,28,28 or 3,32,32") from None
        if c not in (1, 3) or h < 1 or w < 1:
            raise KtnasError(f"--input-shape {shape!r}: C must be 1 or 3 and H, W positive")
        return c, h, w
    return image_shape(net.meta.get("dataset"), net.stem.preprocessing.image_size, "the model's data set")


def export_model(model, fmt: str, out, *, shape=None) -> dict:
    """Write ``model`` (a model.pt) as ``fmt`` to ``out``; the input is a uint8 batch [N, C, H, W] (N free), the
    output the logits [N, classes]. Returns {out, format, input_shape, classes}."""
    if fmt not in FORMATS:
        raise KtnasError(f"unknown --format {fmt!r}: use {' or '.join(FORMATS)}")
    net = load_model(model).eval().requires_grad_(False)  # inference only: outputs need no graph
    c, h, w = input_shape(net, shape)
    example = torch.randint(0, 256, (2, c, h, w), dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            with torch.no_grad():
                torch.jit.trace(net, example).save(str(out))
        else:
            write_onnx(net, example, out, input_name="images", output_name="logits")
    return dict(out=str(out), format=fmt, input_shape=[c, h, w], classes=net.meta.get("classes"),
                cost=model_cost(net).to_json())


RUNTIME = {"onnx": "onnxruntime", "torchscript": "torchscript"}


def cmd_export(args) -> int:
    from ktnas.engine.profile.cost import Cost
    from ktnas.engine.profile.latency import latency, latency_line

    if args.threads is not None and args.threads < 1:
        raise KtnasError(f"--threads must be at least 1, got {args.threads}")
    r = export_model(args.model, args.format, args.out, shape=args.input_shape)
    print(f"wrote {r['out']} ({r['format']}): uint8 images [N, {', '.join(map(str, r['input_shape']))}] -> "
          f"logits [N, {len(r['classes']) if r['classes'] else '?'}]")
    print(f"cost: {Cost(**r['cost']).line()}")
    if args.latency:
        runtime = RUNTIME[args.format]
        print(latency_line(latency(r["out"], runtime, r["input_shape"], threads=args.threads), runtime,
                           threads=args.threads))
    return 0


def add_export_parser(subparsers) -> None:
    s = subparsers.add_parser("export", help="write a model.pt as one ONNX or TorchScript model on raw images")
    s.add_argument("--model", required=True, help="model.pt written by ktnas train")
    s.add_argument("--format", required=True, choices=FORMATS)
    s.add_argument("--out", required=True, help="the file to write (e.g. model.onnx, model.ts)")
    s.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="raw image shape (default: the model's data set's, e.g. 1,28,28 for Fashion-MNIST)")
    s.add_argument("--no-latency", dest="latency", action="store_false",
                   help="do not measure the written model's latency (batch 1 and 32) on its runtime")
    s.add_argument("--threads", type=int, default=None, help="intra-op threads of the latency measurement "
                   "(default: the runtime's own choice; 1 as `ktnas bench latency --threads 1` measures)")
    s.set_defaults(func=cmd_export)
