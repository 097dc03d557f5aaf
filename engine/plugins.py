"""Search spaces, algorithms and anything else that registers itself, loaded from outside ktnas: the modules named
by the ``ktnas.plugins`` entry points of installed packages, and those in ``KTNAS_PLUGINS`` (module names or
``.py`` files, separated by commas or the path separator). A plug-in module registers what it defines when it is
imported (``register_space(...)``, ``@register_algorithm``); ``ktnas`` loads the plug-ins before it reads its
command line, so their names are flags and choices like the built-in ones."""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path

from ktnas.cache.errors import KtnasError, first_line

GROUP = "ktnas.plugins"
ENV = "KTNAS_PLUGINS"


def _load_file(path: Path):
    name = "ktnas_plugin_" + re.sub(r"\W", "_", str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_plugins(env: str | None = None) -> list[str]:
    """Import every plug-in (entry points of group ``ktnas.plugins``, then ``KTNAS_PLUGINS`` or ``env``); a module
    already imported is not imported again. Returns what was named; a plug-in that cannot be imported is a
    one-line KtnasError naming it."""
    named = [ep.value for ep in entry_points(group=GROUP)]
    text = os.environ.get(ENV, "") if env is None else env
    named += [p.strip() for p in re.split(rf"[,{re.escape(os.pathsep)}]", text) if p.strip()]
    for item in named:
        try:
            if item.endswith(".py"):
                if not Path(item).is_file():
                    raise FileNotFoundError(f"no such file {item}")
                _load_file(Path(item))
            else:
                importlib.import_module(item.split(":")[0])
        except Exception as e:  # noqa: BLE001 - any failure of foreign code: one line naming it
            raise KtnasError(f"plug-in {item!r} ({ENV} or a {GROUP} entry point) could not be loaded: "
                             f"{type(e).__name__}: {first_line(e)}; fix it or remove it") from None
    return named


__all__ = ["load_plugins", "GROUP", "ENV"]
