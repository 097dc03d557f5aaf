"""The ``ktnas`` command. A thin layer: each subcommand maps its flags onto one documented Python call.

The engine's own subcommands are added here; any other package adds its own through an entry point of group
``ktnas.commands`` (``name = "package.module:register"``, ``register(subparsers)`` adding its subcommands with
``set_defaults(func=...)``), so the engine never imports them (``ktnas.bench`` is one: ``ktnas bench``).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from importlib.metadata import entry_points

from ktnas.cache.commands import register_store_commands
from ktnas.cache.errors import KtnasError

COMMANDS_GROUP = "ktnas.commands"


def register_engine_commands(sub, argv=None) -> None:
    """Add ``search``, ``train``, ``evaluate``, ``evolve``, ``genotype``, ``predict``, ``export`` and ``doctor`` to
    the ``ktnas`` subparsers ``sub``; ``argv``: the command line (default ``sys.argv[1:]``), whose ``--algo``
    decides which algorithm's options ``search`` shows."""
    from ktnas.engine.profile.doctor import add_doctor_parser
    from ktnas.engine.evolve.loop import add_evolve_parser
    from ktnas.engine.train.export import add_export_parser
    from ktnas.engine.genotypes import add_genotype_parser
    from ktnas.engine.train.predict import add_predict_parser
    from ktnas.engine.rank.run import add_rank_parser
    from ktnas.engine.search.loop import add_search_parser
    from ktnas.engine.train.loop import add_evaluate_parser, add_train_parser

    add_search_parser(sub, argv)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_evolve_parser(sub)
    add_rank_parser(sub)
    add_genotype_parser(sub)
    add_predict_parser(sub)
    add_export_parser(sub)
    add_doctor_parser(sub)


def register_plugin_commands(sub) -> None:
    """Add the subcommands of every ``ktnas.commands`` entry point, in the order of their names. A plug-in that
    fails to load is left out with a one-line warning (the other commands still work)."""
    seen = set()
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if ep.name in seen:
            continue
        seen.add(ep.name)
        try:
            ep.load()(sub)
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not take the whole command down
            print(f"ktnas: warning: command plug-in {ep.name!r} ({ep.value}) not loaded: {type(e).__name__}: {e}",
                  file=sys.stderr)


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The ``ktnas`` parser for the command line ``argv`` (default ``sys.argv[1:]``), after loading the plug-ins
    (``ktnas.engine.plugins``), whose spaces and algorithms it offers."""
    from ktnas.engine.plugins import load_plugins

    load_plugins()
    p = argparse.ArgumentParser(prog="ktnas", description="Fast, memory-lean NAS by knowledge transfer from frozen "
                                                          "pretrained stems.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_store_commands(sub)
    register_engine_commands(sub, argv)
    register_plugin_commands(sub)
    return p


def main(argv=None) -> int:
    try:
        parser = build_parser(argv)
    except KtnasError as e:  # a plug-in that cannot be loaded
        print(f"ktnas: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    fmt = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.formatwarning = lambda msg, cat, *a, **k: f"ktnas: warning: {msg}\n"
        try:
            return int(args.func(args) or 0)
        except KtnasError as e:  # the kernels' KernelError is one
            print(f"ktnas: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("ktnas: interrupted", file=sys.stderr)
            return 130
        finally:
            warnings.formatwarning = fmt


if __name__ == "__main__":
    sys.exit(main())
