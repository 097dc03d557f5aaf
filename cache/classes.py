"""Classes by name: an image folder's class folders (or another split's classes) mapped onto the classes a store
or a model carries, so that labels mean the same class whatever order the folders sort in."""
from __future__ import annotations

import dataclasses

import torch

from .errors import KtnasError


def _class_key(name: str) -> str:
    """A class name compared loosely: case, and '/', '_', '-' and spaces taken alike ("Ankle boot" ==
    "ankle_boot" == "T-shirt/top"'s "t_shirt_top")."""
    return "".join(" " if c in "/_- " else c for c in str(name).strip().lower()).replace(" ", "")


def class_mapping(have: list[str], want: list[str], what: str, target: str) -> list[int]:
    """For each class of ``have`` (e.g. an image folder's class folders, in their order) the index of the class
    of ``want`` (the model's or the store's classes) it is: by exact name, then by name compared loosely
    (:func:`_class_key`), or by index when ``have`` is the folders ``0`` .. ``N-1``. A class that maps to none of
    ``want`` is refused in one line that lists both sets (``what`` and ``target`` name them)."""
    have, want = [str(c) for c in have], [str(c) for c in want]
    if have == want:
        return list(range(len(want)))
    exact = {c: i for i, c in enumerate(want)}
    loose = {}
    for i, c in enumerate(want):
        loose.setdefault(_class_key(c), i)
    out, unknown = [], []
    for c in have:
        if c in exact:
            out.append(exact[c])
        elif _class_key(c) in loose:
            out.append(loose[_class_key(c)])
        elif c.isdigit() and str(int(c)) == c and int(c) < len(want):  # folders 0..N-1: the classes' order
            out.append(int(c))
        else:
            unknown.append(c)
    if unknown or len(set(out)) != len(out):
        why = (f"class(es) {', '.join(map(repr, unknown[:6]))}{' ...' if len(unknown) > 6 else ''} name none of"
               if unknown else "two classes map to one of")
        raise KtnasError(f"{what}'s classes ({', '.join(have[:12])}{' ...' if len(have) > 12 else ''}): {why} "
                         f"{target}'s ({', '.join(want[:12])}{' ...' if len(want) > 12 else ''}): name the folders "
                         f"after {target}'s classes (or 0..{len(want) - 1} in its order), or use the data set it was "
                         f"trained on")
    return out


def relabel(split, classes: list[str], target: str):
    """``split`` (a ``ktnas.cache.datasets.ImageSplit``) with its labels mapped onto ``classes`` by name
    (:func:`class_mapping`); the classes become ``classes``. Unchanged when they are the same already."""
    mapping = class_mapping(split.classes, classes, split.dataset, target)
    if mapping == list(range(len(classes))) and len(split.classes) == len(classes):
        return split
    table = torch.tensor(mapping, dtype=torch.int64)
    return dataclasses.replace(split, labels=table[split.labels], num_classes=len(classes), classes=list(classes))
