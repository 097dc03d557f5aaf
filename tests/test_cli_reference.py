"""The command-line reference (docs/reference/cli.md) is what the parsers say: no flag missing, none stale."""
import argparse
from pathlib import Path

from ktnas.engine.cli import build_parser
from ktnas.engine.cli_reference import DEFAULT_OUT, _subcommands, render

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_file_is_what_the_parsers_give(monkeypatch):
    monkeypatch.delenv("KTNAS_PLUGINS", raising=False)
    assert (ROOT / DEFAULT_OUT).read_text() == render(), \
        f"{DEFAULT_OUT} is stale: write it again with `python -m ktnas.engine.cli_reference`"


def test_every_flag_of_every_command_is_in_the_reference(monkeypatch):
    """Independently of how it is rendered: each visible option string of each command, benchmark and search
    algorithm appears in the reference, as does each command's name."""
    monkeypatch.delenv("KTNAS_PLUGINS", raising=False)
    from ktnas.engine.algorithms import ALGORITHMS

    text = render()
    parsers = {}
    for algo in ALGORITHMS:
        for name, p in _subcommands(build_parser(["search", "--algo", algo])).items():
            parsers[(name, algo if name == "search" else None)] = p
            for bench, bp in _subcommands(p).items():
                parsers[(f"{name} {bench}", None)] = bp
    assert len(parsers) > 20
    for (name, _), p in parsers.items():
        assert f"`ktnas {name}`" in text, name
        for a in p._actions:
            if a.help != argparse.SUPPRESS:
                for flag in a.option_strings:
                    if flag not in ("-h", "--help"):
                        forms = (f"`{flag} ", f"`{flag}`", f", {flag} ", f", {flag}`")  # not a longer flag
                        assert any(f in text for f in forms), (name, flag)
