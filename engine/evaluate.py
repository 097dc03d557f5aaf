"""``ktnas evaluate``: an exported model (``model.pt``) measured on the raw images of a data set's split."""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from ktnas.cache.datasets import load_split
from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import resolve_device

from . import runs
from .network import load_model


@torch.no_grad()
def evaluate(model: str, dataset: str | None = None, split: str = "test", *, limit: int | None = None,
             batch_size: int = 256, data_root: str | None = None, device: str = "auto",
             progress: bool = False) -> dict:
    """Accuracy and loss of an exported model (``model.pt``) on the raw images of a data set's split."""
    dev = resolve_device(device)
    net = load_model(model).to(dev)
    dataset = dataset or net.meta.get("dataset")
    if not dataset:
        raise KtnasError(f"{model} records no data set: pass --dataset")
    data = load_split(dataset, split, root=data_root, image_size=net.stem.preprocessing.image_size,
                      seed=int(net.meta.get("seed", 0)))
    n = len(data) if limit is None else min(int(limit), len(data))
    if n < 1 or batch_size < 1:
        raise KtnasError(f"nothing to evaluate ({n} images, batch size {batch_size}): pass positive --limit and "
                         "--batch-size")
    loss_sum, correct = 0.0, 0
    for a in runs.progress(range(0, n, batch_size), desc="evaluate", enabled=progress):
        b = min(n, a + batch_size)
        images, labels = data.get_batch(slice(a, b)).to(dev), data.labels[a:b]
        logits = net(images).cpu()
        if int(labels.max()) >= logits.shape[1]:
            raise KtnasError(f"{dataset} has labels up to {int(labels.max())}, the model predicts "
                             f"{logits.shape[1]} classes: evaluate it on the data set it was trained for")
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    return dict(model=str(model), dataset=dataset, split=split, n=n, correct=correct, accuracy=100.0 * correct / n,
                loss=loss_sum / n)


def cmd_evaluate(args) -> int:
    r = evaluate(args.model, args.dataset, args.split, limit=args.limit, batch_size=args.batch_size,
                 data_root=args.data_root, device=args.device, progress=not args.quiet)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} on {r['dataset']} {r['split']} ({r['n']} images): accuracy {r['accuracy']:.2f}% "
              f"({r['correct']}/{r['n']}), loss {r['loss']:.4f}")
    return 0



def add_evaluate_parser(subparsers):
    """The ``evaluate`` subcommand."""
    s = subparsers.add_parser("evaluate", help="accuracy of an exported model.pt on raw images")
    s.add_argument("--model", required=True, help="model.pt written by ktnas train")
    s.add_argument("--dataset", default=None, help="data set (default: the one the model was trained on)")
    s.add_argument("--split", default="test", choices=("train", "test"))
    s.add_argument("--limit", type=int, default=None, help="first N images only")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--data-root", default=None, help="folder with the data set's files")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_evaluate)
    return s
