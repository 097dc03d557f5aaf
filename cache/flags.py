"""Command-line flags generated from config dataclasses, so a setting's default and help live in one place.

A config field documents itself through ``dataclasses.field(default=..., metadata={...})``; every key is optional:

``help``
    the help text. A field whose default is None means "decided later" (a paper default, the device's): say in
    the help what it is, or let the parser's overrides add it (``ktnas search`` shows the algorithm's); other
    defaults are appended as ``(default: X)`` unless the text shows one.
``choices``, ``metavar``, ``required``
    as in :meth:`argparse.ArgumentParser.add_argument`.
``flag``
    the flag's name without the dashes (default: the field's name, ``_`` spelled ``-``). For a bool whose
    default is True the flag turns it off (default ``no-NAME``; e.g. ``progress`` with ``flag="quiet"``).
``type``
    a callable parsing the flag's text, replacing the one the annotation implies.
``exclusive``
    a group name: the flags of the fields naming the same group are mutually exclusive.
``min``
    the smallest value the config's own check accepts (not a flag setting; read by that check).

Annotations understood: ``int``, ``float``, ``str``, ``bool`` (store_true when the default is False, store_false
when True), ``X | None``, ``Literal[...]`` (choices), ``tuple[X, ...]`` and fixed ``tuple[X, Y]`` (comma
separated; ``''`` is the empty tuple). Anything else needs a ``type`` in its metadata.

:func:`config_from_args` builds the dataclass back from the parsed namespace; :func:`check_positive` is the one
positive-integer check; :func:`parse_size` and :func:`format_bytes` read and print byte sizes.
"""
from __future__ import annotations

import argparse
import dataclasses
import numbers
import re
import types
import typing

from .errors import KtnasError


def option(default=None, help: str | None = None, **metadata):
    """A config field with its flag's help and other metadata keys (module docstring): ``x: int = option(3,
    "what x is")``. The one way every ktnas config declares a setting."""
    return dataclasses.field(default=default, metadata=dict(metadata, **({"help": help} if help else {})))


def flag_name(cls_or_cfg, name: str) -> str:
    """The flag (without dashes) of field ``name`` of a config dataclass (class or instance)."""
    f = {f.name: f for f in dataclasses.fields(cls_or_cfg)}.get(name) if dataclasses.is_dataclass(cls_or_cfg) else None
    flag = f.metadata.get("flag") if f is not None else None
    if flag is None and f is not None and f.default is True:
        return "no-" + name.replace("_", "-")
    return flag or name.replace("_", "-")


# ------------------------------------------------------------------------------------------- field kinds
def _strip_optional(tp):
    """``(X, True)`` for ``X | None`` / ``Optional[X]``, else ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def _scalar(tp, what: str):
    if tp in (int, float, str):
        return tp
    raise TypeError(f"{what}: cannot make a flag of {tp!r}; give the field metadata['type']")


def comma_tuple(item=int, length: int | None = None):
    """An argparse type parsing ``"1,2,3"`` into a tuple of ``item`` (``""`` → ``()``), of ``length`` if given."""
    name = {int: "integers", float: "numbers"}.get(item, getattr(item, "__name__", "values"))

    def parse(text: str) -> tuple:
        parts = [p.strip() for p in str(text).split(",")] if str(text).strip() else []
        try:
            values = tuple(item(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {name}, got {text!r}") from None
        if length is not None and len(values) != length:
            raise argparse.ArgumentTypeError(f"expected {length} comma-separated {name}, got {text!r}")
        return values

    parse.__name__ = f"comma-separated {name}"
    return parse


def _type_of(tp, what: str):
    """``(argparse type, implied choices)`` of an annotation without its ``| None``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return (kinds.pop() if len(kinds) == 1 else str), tuple(args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return comma_tuple(_scalar(args[0], what)), None
        if args and len(set(args)) == 1:
            return comma_tuple(_scalar(args[0], what), len(args)), None
        raise TypeError(f"{what}: cannot make a flag of {tp!r}; give the field metadata['type']")
    return _scalar(tp, what), None


def _show(value) -> str:
    """A default as the user would type it (tuples comma-separated), with ``%`` escaped for argparse."""
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return text.replace("%", "%%")


def _help(text, default) -> str | None:
    if default is None or default is dataclasses.MISSING or (text and ("default" in text)):
        return text
    return f"{text} (default: {_show(default)})" if text else f"default: {_show(default)}"


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _argument(f: dataclasses.Field, tp, spec: dict, cls_name: str) -> tuple[str, dict]:
    """The flag and the ``add_argument`` keywords of one field."""
    what = f"{cls_name}.{f.name}"
    default = spec.pop("default", _default(f))
    spec.pop("min", None)
    kw = {k: spec.pop(k) for k in ("choices", "metavar") if spec.get(k) is not None}
    tp, _ = _strip_optional(tp)
    flag = spec.pop("flag", None)
    if tp is bool and "type" not in spec:
        if default is True:
            kw.update(action="store_false", help=spec.pop("help", None))
            flag = flag or "no-" + f.name.replace("_", "-")
        else:
            kw.update(action="store_true", help=spec.pop("help", None))
        kw["default"] = bool(default)
    else:
        parse = spec.pop("type", None)
        implied = None
        if parse is None:
            parse, implied = _type_of(tp, what)
        kw["type"] = parse
        if implied is not None:
            kw.setdefault("choices", implied)
        if default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
        if "required" in spec:
            kw["required"] = spec.pop("required")
        kw["help"] = _help(spec.pop("help", None), kw.get("default"))
    kw.update(spec)  # the overrides' plain add_argument keywords
    return "--" + (flag or f.name.replace("_", "-")), kw


def add_config_arguments(parser, cls, *, skip=(), overrides=None) -> dict[str, argparse.Action]:
    """Add a flag to ``parser`` (a parser or argument group) for every init field of dataclass ``cls``.

    ``skip``: field names to leave out (their dataclass default stands, or the caller adds its own flag).
    ``overrides``: ``{field: {key: value}}`` replacing the field's metadata keys (``help``, ``flag``, ...) or
    passed on to ``add_argument`` (``default``, ``dest``, ...). Each flag's ``dest`` is the field's name, so
    :func:`config_from_args` finds it. Returns ``{field: argparse.Action}``.
    """
    overrides = overrides or {}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))} to override")
    hints = typing.get_type_hints(cls)
    groups: dict[str, object] = {}
    actions = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        spec = {**f.metadata, **overrides.get(f.name, {})}
        exclusive = spec.pop("exclusive", None)
        flag, kw = _argument(f, hints[f.name], spec, cls.__name__)
        target = parser
        if exclusive is not None:
            if exclusive not in groups:
                groups[exclusive] = parser.add_mutually_exclusive_group()
            target = groups[exclusive]
        actions[f.name] = target.add_argument(flag, dest=kw.pop("dest", f.name), **kw)
    return actions


def peek_flag(argv, name: str, default=None):
    """The value of ``--NAME X`` / ``--NAME=X`` in ``argv`` before it is parsed (the last one wins; ``default``
    without it): what a parser whose flags depend on it (``ktnas search --algo``) needs first."""
    flag, value = "--" + name.replace("_", "-"), default
    argv = [str(a) for a in argv]
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def config_from_args(cls, args: argparse.Namespace, **extra):
    """``cls(**fields)`` from the parsed ``args`` (fields without a flag keep their default); ``extra`` wins."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    values.update(extra)
    return cls(**values)


# ------------------------------------------------------------------------------------------- validation
def check_positive(cfg, names) -> None:
    """KtnasError ``--FLAG must be a positive integer, got V`` for the first of ``names`` not an integer >= 1
    (None and bools included: call this once the paper defaults are filled in)."""
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise KtnasError(f"--{flag_name(cfg, name)} must be a positive integer, got {v!r}")


# ------------------------------------------------------------------------------------------------ sizes
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_size(text) -> int:
    """Bytes of a size: an int, or a number with an optional unit (case-insensitive): B; KiB/MiB/GiB/TiB and
    K/M/G/T binary (powers of 1024); KB/MB/GB/TB decimal. ``parse_size("2GiB") == 2 << 30``. KtnasError unless
    the result is a positive number of bytes."""
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise KtnasError(f"bad size {text!r}: pass bytes or a number with a unit, e.g. 2GiB, 1500MiB, 8GB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise KtnasError(f"bad size {text!r}: it must be at least 1 byte")
    return value


def format_bytes(n: float) -> str:
    """``"512 B"``, ``"1.5 KiB"``, ``"684.0 MiB"``, ``"2.0 GiB"``, ``"3.1 TiB"``: binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


__all__ = ["option", "add_config_arguments", "config_from_args", "check_positive", "comma_tuple", "flag_name",
           "format_bytes", "parse_size", "peek_flag"]
