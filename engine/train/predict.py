"""``ktnas predict``: class names and probabilities of an exported model (``model.pt``) for image files."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import resolve_device

from ktnas.engine.train.network import load_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_files(paths) -> list[Path]:
    """The image files named by ``paths`` (files, or folders searched recursively), in a stable order."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise KtnasError(f"{p}: no such image file or folder: pass PNG/JPEG files or a folder holding them")
    if not out:
        raise KtnasError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return out


def read_image(path: Path) -> torch.Tensor:
    """uint8 [1, C, H, W]: grayscale stays 1 channel, colour (palette and alpha dropped) 3."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L") if im.mode in ("L", "I;16", "I", "1", "LA") else im.convert("RGB")
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            w, h = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise KtnasError(f"{path}: not a readable image ({type(e).__name__}): pass PNG or JPEG files") from None
    c = x.numel() // (w * h)
    return x.view(h, w, c).permute(2, 0, 1).unsqueeze(0).contiguous()


@torch.no_grad()
def predict(model: str, paths, *, top: int = 3, device: str = "auto") -> list[dict]:
    """Per image: {path, top: [{class, index, probability}, ...]} (``top`` classes, most probable first)."""
    if top < 1:
        raise KtnasError(f"--top must be at least 1, got {top}")
    dev = resolve_device(device)
    net = load_model(model).to(dev).eval()
    files = image_files(paths)
    classes = net.meta.get("classes")
    rows = []
    for f in files:
        p = torch.softmax(net(read_image(f).to(dev)).float(), dim=1)[0].cpu()
        names = classes or [str(k) for k in range(p.numel())]
        k = min(top, p.numel())
        v, i = p.topk(k)
        rows.append(dict(path=str(f), top=[dict(index=int(j), probability=float(q), **{"class": names[int(j)]})
                                           for q, j in zip(v, i)]))
    return rows


def cmd_predict(args) -> int:
    rows = predict(args.model, args.images, top=args.top, device=args.device)
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        print(f"{r['path']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"]))
    return 0


def add_predict_parser(subparsers) -> None:
    s = subparsers.add_parser("predict", help="class names and probabilities of a model.pt for image files")
    s.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...; grayscale or colour, any size) or folders")
    s.add_argument("--model", required=True, help="model.pt written by ktnas train")
    s.add_argument("--top", type=int, default=3, help="classes per image (default: %(default)s)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--json", action="store_true", help="one JSON list")
    s.set_defaults(func=cmd_predict)
