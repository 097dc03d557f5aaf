"""The command-line reference, generated from the ``ktnas`` parsers themselves.

``python -m ktnas.engine.cli_reference [FILE]`` writes it (default ``docs/reference/cli.md``); a test keeps that
file equal to what :func:`render` gives, so a flag added, removed or changed fails the test until the file is
written again. Every subcommand, every benchmark and every search algorithm's own options are listed, with their
help as ``--help`` shows it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = "docs/reference/cli.md"


def _subcommands(parser) -> dict:
    """``{name: parser}`` of ``parser``'s subcommands (empty when it has none)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text.replace("[", "\\[").replace("]", "\\]")  # `A[B][C]` in a help would read as a link


def _table(parser, keep=lambda action: True) -> list[str]:
    """A markdown table of ``parser``'s options (and positionals) and their help as ``--help`` gives it (defaults
    included), those ``--help`` hides left out."""
    fmt = parser._get_formatter()
    rows = []
    for a in parser._actions:
        if (a.help == argparse.SUPPRESS or isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
                or not keep(a)):
            continue
        if a.option_strings:
            names = ", ".join(a.option_strings)
            if a.nargs != 0:  # it takes a value: its metavar as --help writes it
                names += " " + fmt._format_args(a, fmt._get_default_metavar_for_optional(a))
        else:
            names = fmt._format_args(a, fmt._get_default_metavar_for_positional(a))
        rows.append(f"| `{_cell(names)}` | {_cell(fmt._expand_help(a) if a.help else '')} |")
    if not rows:
        return []
    return ["| option | |", "|---|---|", *rows, ""]


def _section(title: str, parser, level: int = 2, keep=lambda action: True) -> list[str]:
    out = [f"{'#' * level} `{title}`", ""]
    if parser.description:
        out += [_cell(parser.description), ""]
    return out + _table(parser, keep)


def render() -> str:
    """The reference as markdown: one section per ``ktnas`` subcommand (and per ``ktnas bench`` benchmark), and
    ``ktnas search``'s options per algorithm."""
    from ktnas.engine.algorithms import ALGORITHMS
    from ktnas.engine.cli import build_parser
    from ktnas.engine.search.loop import OPTION_DEST

    own = lambda a: a.dest.startswith(OPTION_DEST)  # noqa: E731 - an algorithm's own option
    out = ["# Command-line reference", "",
           "Generated from the parsers by `python -m ktnas.engine.cli_reference`; `ktnas COMMAND --help` shows the "
           "same. `ktnas search` lists the shared options with DARTS' paper defaults, then each algorithm's own.", ""]
    for name, parser in _subcommands(build_parser(["search"])).items():
        benchmarks = _subcommands(parser)
        if name == "search":
            out += _section("ktnas search", parser, keep=lambda a: not own(a))
            for algo in ALGORITHMS:
                search = _subcommands(build_parser(["search", "--algo", algo]))["search"]
                out += [f"### `--algo {algo}`", "", *(_table(search, own) or ["No options of its own.", ""])]
        elif benchmarks:
            out += _section(f"ktnas {name}", parser)
            for bench, bp in benchmarks.items():
                out += _section(f"ktnas {name} {bench}", bp, level=3)
        else:
            out += _section(f"ktnas {name}", parser)
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
