"""``ktnas evaluate``: an exported model (``model.pt``) measured on the raw images of a data set's split."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ktnas.cache.classes import relabel
from ktnas.cache.datasets import load_split
from ktnas.cache.errors import KtnasError
from ktnas.cache.runtime import resolve_device

from ktnas.engine import runs
from ktnas.engine.profile.cost import model_cost
from ktnas.engine.profile.latency import latency as measure_latency
from ktnas.engine.train.network import load_model


@torch.no_grad()
def evaluate(model: str, dataset: str | None = None, split: str = "test", *, limit: int | None = None,
             batch_size: int = 256, data_root: str | None = None, device: str = "auto",
             progress: bool = False, latency: bool = False) -> dict:
    """Accuracy and loss of an exported model (``model.pt``) on the raw images of a data set's split, and its cost
    (weights, multiply-adds, the stem's share); ``latency``: also its PyTorch latency on ``device`` at batch 1 and
    32 for images of the split's shape."""
    dev = resolve_device(device)
    net = load_model(model).to(dev)
    dataset = dataset or net.meta.get("dataset")
    if not dataset:
        raise KtnasError(f"{model} records no data set: pass --dataset")
    data = load_split(dataset, split, root=data_root, image_size=net.stem.preprocessing.image_size,
                      seed=int(net.meta.get("seed", 0)))
    classes = net.meta.get("classes")
    if classes:  # an image folder's class folders mapped onto the model's classes by name (or 0..N-1)
        data = relabel(data, list(classes), "the model")
    n = len(data) if limit is None else min(int(limit), len(data))
    if n < 1 or batch_size < 1:
        raise KtnasError(f"nothing to evaluate ({n} images, batch size {batch_size}): pass positive --limit and "
                         "--batch-size")
    loss_sum, correct = 0.0, 0
    confusion, shape = None, None
    for a in runs.progress(range(0, n, batch_size), desc="evaluate", enabled=progress):
        b = min(n, a + batch_size)
        images, labels = data.get_batch(slice(a, b)).to(dev), data.labels[a:b]
        shape = shape or list(images.shape[1:])
        logits = net(images).cpu()
        if int(labels.max()) >= logits.shape[1]:
            raise KtnasError(f"{dataset} has labels up to {int(labels.max())}, the model predicts "
                             f"{logits.shape[1]} classes: evaluate it on the data set it was trained for")
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        pred = logits.argmax(1)
        correct += int((pred == labels).sum())
        if confusion is None:
            confusion = torch.zeros(logits.shape[1], logits.shape[1], dtype=torch.int64)
        confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    names = list(classes) if classes else [str(k) for k in range(confusion.shape[0])]
    per_class = {names[k]: 100.0 * int(confusion[k, k]) / int(confusion[k].sum())
                 for k in range(confusion.shape[0]) if int(confusion[k].sum())}
    out = dict(model=str(model), dataset=dataset, split=split, n=n, correct=correct, accuracy=100.0 * correct / n,
               loss=loss_sum / n, classes=names, per_class_accuracy=per_class, confusion=confusion.tolist(),
               image_shape=shape, cost=model_cost(net).to_json())
    if latency:
        out["latency_ms"] = {str(b): t for b, t in measure_latency(net, "torch", shape, device=dev).items()}
        out["latency_device"] = str(dev)
    return out


def plot_confusion(r: dict, path) -> None:
    """The confusion matrix (rows: true class, columns: predicted; each row as a share of its images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(r["confusion"], dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    k = len(r["classes"])
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * k, 1.2 + 0.5 * k))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), r["classes"], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), r["classes"], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{r['dataset']} {r['split']}: {r['accuracy']:.2f}% of {r['n']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_evaluate(args) -> int:
    from ktnas.engine.profile.cost import Cost
    from ktnas.engine.profile.latency import latency_line

    r = evaluate(args.model, args.dataset, args.split, limit=args.limit, batch_size=args.batch_size,
                 data_root=args.data_root, device=args.device, progress=not args.quiet, latency=args.latency)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(r, indent=1))
        plot_confusion(r, out / "confusion.png")
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} on {r['dataset']} {r['split']} ({r['n']} images): accuracy {r['accuracy']:.2f}% "
              f"({r['correct']}/{r['n']}), loss {r['loss']:.4f}")
        for name, acc in r["per_class_accuracy"].items():
            print(f"  {name:>20}: {acc:6.2f}%")
        print(f"cost: {Cost(**r['cost']).line()}")
        if args.latency:
            ms = {int(b): t for b, t in r["latency_ms"].items()}
            print(latency_line(ms, "torch", r["latency_device"]))
        if args.out:
            print(f"wrote {Path(args.out) / 'evaluation.json'}, {Path(args.out) / 'confusion.png'}")
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
    s.add_argument("--out", default=None, metavar="DIR", help="write evaluation.json and confusion.png there")
    s.add_argument("--no-latency", dest="latency", action="store_false",
                   help="do not measure the model's latency (batch 1 and 32, PyTorch on --device)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_evaluate)
    return s
