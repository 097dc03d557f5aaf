"""Genotypes in the forms people have them: ktnas JSON (with or without its ``"space"`` key), the ``Genotype(...)``
text of DARTS' and PC-DARTS' ``genotypes.py`` (parsed with ``ast``, never evaluated), and NAS-Bench-201's
architecture strings (``|nor_conv_3x3~0|+|skip_connect~0|none~1|+...``); and each genotype printed back in
every form that fits it (``ktnas genotype show``)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

from ktnas.cache.errors import KtnasError

from .spaces import SPACES, genotype_from_json, space_of

FORMS = ("json", "darts", "nb201")
FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")  # DARTS' namedtuple, in its order
HINT = ("pass a genotype.json written by ktnas search, a DARTS Genotype(...) text, an NB201 architecture string, "
        "or a file holding one")


def parse_genotype(source):
    """A genotype from ``source``: a path (``FILE`` or ``FILE:NAME`` for one of several ``NAME = Genotype(...)``
    in a Python file) or the text itself, in any of the forms of the module docstring; a one-line KtnasError
    naming what is wrong otherwise."""
    text, where, name = _read(source)
    t = text.strip()
    if not t:
        raise KtnasError(f"{where}: empty genotype; {HINT}")
    if t.startswith("{"):
        try:
            d = json.loads(t)
        except json.JSONDecodeError as e:
            raise KtnasError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}); {HINT}") from None
        return _from_json(d, where)
    if t.startswith("|"):
        return _wrap(lambda: SPACES["nb201"].genotype.from_string(t), where)
    if "Genotype" in t:
        return _wrap(lambda: _from_darts_text(t, name), where)
    raise KtnasError(f"{where}: not a genotype in a known form; {HINT}")


def _read(source) -> tuple[str, str, str | None]:
    """(text, where it came from for messages, the NAME of FILE:NAME or None)."""
    s = str(source)
    path, name = Path(s), None
    if not _is_file(path) and ":" in s and _is_file(Path(s.rsplit(":", 1)[0])):
        path, name = Path(s.rsplit(":", 1)[0]), s.rsplit(":", 1)[1]
    if _is_file(path):
        try:
            return path.read_text(), str(path), name
        except (OSError, UnicodeDecodeError) as e:
            raise KtnasError(f"{path}: cannot read genotype ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             f"{HINT}") from None
    looks_like_path = s.endswith((".json", ".py", ".txt")) or ("/" in s and not s.lstrip().startswith(("|", "{")))
    if looks_like_path and "Genotype" not in s:
        raise KtnasError(f"{s}: no such genotype file; {HINT}")
    return s, "genotype text", None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # text far longer than a file name
        return False


def _wrap(fn, where: str):
    try:
        return fn()
    except KtnasError as e:
        raise KtnasError(f"{where}: {e}") from None


def _from_json(d, where: str):
    """ktnas JSON; without ``"space"`` the space is inferred from its keys."""
    if isinstance(d, dict) and "space" not in d:
        if "normal" in d and "reduce" in d:
            d = dict(d, space="darts")
        elif "arch_str" in d or "edges" in d:
            d = dict(d, space="nb201")
        else:
            raise KtnasError(f"{where}: a genotype JSON needs 'normal' and 'reduce' (DARTS) or 'arch_str' / 'edges' "
                             f"(NB201), it has {', '.join(map(repr, d)) or 'no keys'}")
    return _wrap(lambda: genotype_from_json(d), where)


def _from_darts_text(text: str, name: str | None):
    """The ``Genotype(...)`` call in ``text`` (the one assigned to ``name`` when given), its arguments read as
    literals: lists of (op, input) pairs and concat lists, ``range(2, 6)`` included."""
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
    if len(call.args) > len(FIELDS):
        raise KtnasError(f"Genotype(...) takes {len(FIELDS)} fields ({', '.join(FIELDS)}), got {len(call.args)}")
    values = dict(zip(FIELDS, call.args))
    for kw in call.keywords:
        if kw.arg not in FIELDS:
            raise KtnasError(f"Genotype(...) has no field {kw.arg!r}: its fields are {', '.join(FIELDS)}")
        values[kw.arg] = kw.value
    missing = [f for f in FIELDS if f not in values]
    if missing:
        raise KtnasError(f"Genotype(...) lacks {', '.join(missing)}")
    return genotype_from_json(dict({k: _literal(v, k) for k, v in values.items()}, space="darts"))


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


# --------------------------------------------------------------------------------------------------- output
def darts_text(genotype) -> str:
    """DARTS' own ``Genotype(...)`` text, to paste into the papers' ``genotypes.py``."""
    cells = {f: getattr(genotype, f) for f in FIELDS}
    pairs = lambda g: "[" + ", ".join(f"({op!r}, {j})" for op, j in g) + "]"
    return (f"Genotype(normal={pairs(cells['normal'])}, normal_concat={list(cells['normal_concat'])}, "
            f"reduce={pairs(cells['reduce'])}, reduce_concat={list(cells['reduce_concat'])})")


def format_genotype(genotype, form: str) -> str:
    """``genotype`` as ``form``: json (ktnas'), darts (``Genotype(...)``, DARTS space), nb201 (architecture string,
    NB201 space)."""
    space = space_of(genotype).name
    if form == "json":
        return json.dumps(genotype.to_json())
    if form == "darts" and space == "darts":
        return darts_text(genotype)
    if form == "nb201" and space == "nb201":
        return genotype.to_string()
    if form not in FORMS:
        raise KtnasError(f"unknown --format {form!r}: use one of {', '.join(FORMS)}")
    fits = "json, darts" if space == "darts" else "json, nb201"
    raise KtnasError(f"a {space} genotype has no {form} form: use --format {fits.replace(', ', ' or ')}")


def cmd_genotype_show(args) -> int:
    g = parse_genotype(args.genotype)
    forms = [args.format] if args.format else [f for f in FORMS if f == "json" or f == space_of(g).name]
    for form in forms:
        print(format_genotype(g, form))
    if args.png:
        Path(args.png).mkdir(parents=True, exist_ok=True)
        for p in space_of(g).draw(g, args.png):
            print(f"wrote {p}")
    return 0


def add_genotype_parser(subparsers) -> None:
    """``ktnas genotype show FILE|TEXT [--format json|darts|nb201] [--png DIR]``."""
    g = subparsers.add_parser("genotype", help="read a genotype in any form people have, print it in each form")
    sub = g.add_subparsers(dest="genotype_command", required=True)
    s = sub.add_parser("show", help="print a genotype as ktnas JSON and its space's own form; draw it")
    s.add_argument("genotype", help="genotype.json, DARTS Genotype(...) text or FILE[:NAME], an NB201 string")
    s.add_argument("--format", choices=FORMS, default=None, help="one form only (default: json and the space's)")
    s.add_argument("--png", default=None, metavar="DIR", help="draw the cells into DIR")
    s.set_defaults(func=cmd_genotype_show)
