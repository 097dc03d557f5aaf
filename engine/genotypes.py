"""Genotypes in the forms people have them: ktnas JSON (with or without its ``"space"`` key), the ``Genotype(...)``
text of DARTS' and PC-DARTS' ``genotypes.py`` (parsed with ``ast``, never evaluated), and NAS-Bench-201's
architecture strings (``|nor_conv_3x3~0|+|skip_connect~0|none~1|+...``); and each genotype printed back in
every form that fits it (``ktnas genotype show``)."""
from __future__ import annotations

import json
from pathlib import Path

from ktnas.cache.errors import KtnasError

from ktnas.engine.spaces import SPACES, genotype_from_json, space_of

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
    for space in SPACES.values():
        if space.text_form is not None and space.looks_like(t):
            return _wrap(lambda: space.parse_text(t, name), where)
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
        space = next((sp for sp in SPACES.values() if sp.claims_json(d)), None)
        if space is None:
            needs = ", or ".join(f"{sp.json_keys_text()} ({sp.name})" for sp in SPACES.values() if sp.json_keys)
            raise KtnasError(f"{where}: a genotype JSON without 'space' needs {needs}; it has "
                             f"{', '.join(map(repr, d)) or 'no keys'}")
        d = dict(d, space=space.name)
    return _wrap(lambda: genotype_from_json(d), where)


# --------------------------------------------------------------------------------------------------- output
def forms() -> tuple[str, ...]:
    """The text forms a genotype can be printed in: json, and each registered space's own."""
    return ("json", *dict.fromkeys(sp.text_form for sp in SPACES.values() if sp.text_form))


def format_genotype(genotype, form: str) -> str:
    """``genotype`` as ``form``: json (ktnas'), or its space's own text form (``darts``: ``Genotype(...)``;
    ``nb201``: the architecture string)."""
    space = space_of(genotype)
    if form == "json":
        return json.dumps(genotype.to_json())
    if form not in forms():
        raise KtnasError(f"unknown --format {form!r}: use one of {', '.join(forms())}")
    if form != space.text_form:
        fits = " or ".join(f for f in ("json", space.text_form) if f)
        raise KtnasError(f"a {space.name} genotype has no {form} form: use --format {fits}")
    return space.format_text(genotype)


def cmd_genotype_show(args) -> int:
    g = parse_genotype(args.genotype)
    forms_ = [args.format] if args.format else [f for f in ("json", space_of(g).text_form) if f]
    for form in forms_:
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
    s.add_argument("--format", choices=forms(), default=None, help="one form only (default: json and the space's)")
    s.add_argument("--png", default=None, metavar="DIR", help="draw the cells into DIR")
    s.set_defaults(func=cmd_genotype_show)
