"""DARTS' own text form of a genotype: the ``Genotype(normal=..., normal_concat=..., reduce=..., reduce_concat=...)``
of DARTS' and PC-DARTS' ``genotypes.py``, parsed with ``ast`` (never evaluated) and printed back. AutoDL's form
(GDAS, SETN: ``normal`` grouped per node as ``(('op', i), ('op', j))``, and ``connectN=None, connects=None``)
reads alike."""
from __future__ import annotations

import ast

from ktnas.cache.errors import KtnasError

FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")  # DARTS' namedtuple, in its order
AUTODL_FIELDS = ("connectN", "connects")  # AutoDL's two more; None for the DARTS cells its papers found


def looks_like_darts_text(text: str) -> bool:
    return "Genotype" in text


def parse_darts_text(text: str, name: str | None = None) -> dict:
    """The fields of the ``Genotype(...)`` call in ``text`` (the one assigned to ``name`` when given), its arguments
    read as literals: lists of (op, input) pairs and concat lists, ``range(2, 6)`` included."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise KtnasError(f"not valid Python text ({e.msg}, line {e.lineno})") from None
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and _is_genotype(node.value):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    calls[target.id] = node.value
    bare = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_genotype(n)]
    if name is not None:
        if name not in calls:
            raise KtnasError(f"no genotype named {name!r} (it has {', '.join(calls) or 'none'})")
        call = calls[name]
    elif len(bare) == 1:
        call = bare[0]
    elif not bare:
        raise KtnasError("no Genotype(...) call found")
    else:
        raise KtnasError(f"{len(bare)} genotypes in it: pick one as FILE:NAME ({', '.join(calls)})")
    every = FIELDS + AUTODL_FIELDS
    if len(call.args) > len(every):
        raise KtnasError(f"Genotype(...) takes {len(FIELDS)} fields ({', '.join(FIELDS)}; AutoDL's "
                         f"{', '.join(AUTODL_FIELDS)} too), got {len(call.args)}")
    values = dict(zip(every, call.args))
    for kw in call.keywords:
        if kw.arg not in every:
            raise KtnasError(f"Genotype(...) has no field {kw.arg!r}: its fields are {', '.join(FIELDS)} (AutoDL's "
                             f"{', '.join(AUTODL_FIELDS)} too)")
        values[kw.arg] = kw.value
    missing = [f for f in FIELDS if f not in values]
    if missing:
        raise KtnasError(f"Genotype(...) lacks {', '.join(missing)}")
    for f in AUTODL_FIELDS:
        if f in values and _literal(values.pop(f), f) is not None:
            raise KtnasError(f"AutoDL's {f} is not None: its nodes take another number of inputs than a DARTS "
                             "cell's two, which ktnas's DARTS space cannot build")
    return {k: _per_node(_literal(v, k), k) for k, v in values.items()}


def _per_node(v, field: str):
    """AutoDL groups a cell's pairs per node, ``[(('op', 0), ('op', 1)), ...]``: flattened to DARTS' list."""
    if field in ("normal", "reduce") and isinstance(v, list) and v and all(
            isinstance(node, (list, tuple)) and node and all(isinstance(p, (list, tuple)) for p in node) for node in v):
        return [list(p) for node in v for p in node]
    return v


def _is_genotype(call: ast.Call) -> bool:
    f = call.func
    return (isinstance(f, ast.Name) and f.id == "Genotype") or (isinstance(f, ast.Attribute) and f.attr == "Genotype")


def _literal(node, field: str):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
            and not node.keywords):
        try:
            return list(range(*[ast.literal_eval(a) for a in node.args]))
        except (ValueError, TypeError):
            pass
    try:
        v = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        raise KtnasError(f"Genotype field {field} is not a literal (lists of (op, input) pairs, concat lists, "
                         f"range(a, b)): {ast.unparse(node)[:60]}") from None
    return [list(p) if isinstance(p, tuple) else p for p in v] if isinstance(v, (list, tuple)) else v


def darts_text(genotype) -> str:
    """DARTS' own ``Genotype(...)`` text, to paste into the papers' ``genotypes.py``."""
    cells = {f: getattr(genotype, f) for f in FIELDS}
    pairs = lambda g: "[" + ", ".join(f"({op!r}, {j})" for op, j in g) + "]"
    return (f"Genotype(normal={pairs(cells['normal'])}, normal_concat={list(cells['normal_concat'])}, "
            f"reduce={pairs(cells['reduce'])}, reduce_concat={list(cells['reduce_concat'])})")
