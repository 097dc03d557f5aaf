"""The shape of the package sources (engine/, kernels/, cache/, bench/), read with ``ast``: nothing is imported.

- Imports follow the one-way flow: cache imports nothing from ktnas.engine, ktnas.kernels or ktnas.bench;
  kernels nothing from ktnas.cache (but the error type, ``ktnas.cache.errors``, which every package may import and
  which imports nothing), ktnas.engine or ktnas.bench; engine imports cache and kernels, never ktnas.bench; nothing
  but bench itself imports ktnas.bench. Function-local imports count, and so do
  ``importlib.import_module("ktnas....")`` calls with a literal name.
- No import cycle between files, function-local imports included (a package's ``__init__`` counts as a file).
- No module is longer than MAX_MODULE_LINES (400) lines, and no function or method than MAX_FUNCTION_LINES (60),
  counted from its ``def`` line to its last line, docstring included (no tolerance).
- No private name (one leading underscore; dunders are public) crosses a module boundary inside ktnas:
  neither ``from ktnas.x import _y`` / ``from .x import _y`` nor ``mod._y`` on a name bound to a ktnas module.

Each test fails with every offender listed, one ``file:line: what`` per line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "kernels", "engine", "bench")  # folder = ktnas.<folder>
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# too long, not split yet: a ratchet, not a licence. Any other offender fails, and
# so does a listed one that is no longer too long (take it off the list then).
KNOWN_LONG: set[str] = set()
SHARED = {"ktnas.cache.errors"}  # every package may import these
FORBIDDEN = {  # package -> the ktnas packages it must not import
    "cache": {"engine", "kernels", "bench"},
    "kernels": {"cache", "engine", "bench"},
    "engine": {"bench"},
    "bench": set(),
}


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every source file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = ["ktnas", *path.relative_to(ROOT).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _where(module: str, node: ast.AST) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{node.lineno}"


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from ... import`` (relative ones resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = _package_of(module).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """``(node, imported module)`` for every import in ``module``, at any depth."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:  # `from ktnas import bench` imports ktnas.bench
                sub = f"{target}.{alias.name}"
                yield node, sub if sub in MODULES else target
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node, node.args[0].value


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _report(what: str, offenders: list[str]) -> None:
    if offenders:
        pytest.fail(f"{len(offenders)} {what}:\n" + "\n".join(offenders), pytrace=False)


def test_the_checks_see_the_packages():
    """The walk reads every package and resolves relative imports (an empty walk would pass every check)."""
    assert {"ktnas.engine.cli", "ktnas.engine.spaces", "ktnas.engine.spaces.darts", "ktnas.engine.search.run",
            "ktnas.kernels.mixed", "ktnas.cache.store", "ktnas.bench"} <= set(MODULES)
    assert _resolve("ktnas.engine.spaces.darts", ast.parse("from ..ops import OPS").body[0]) == "ktnas.engine.ops"
    assert _resolve("ktnas.engine.spaces", ast.parse("from .base import x").body[0]) == "ktnas.engine.spaces.base"
    assert _resolve("ktnas.engine.cli", ast.parse("from . import flags").body[0]) == "ktnas.engine"


def test_imports_flow_one_way():
    offenders = []
    for module in MODULES:
        pkg = module.split(".")[1]
        for node, target in _imports(module):
            parts = target.split(".")
            if target in SHARED:
                continue
            if parts[0] == "ktnas" and len(parts) > 1 and parts[1] in FORBIDDEN[pkg]:
                offenders.append(f"{_where(module, node)}: ktnas.{pkg} imports {target} "
                                 f"(ktnas.{pkg} must not import ktnas.{parts[1]})")
    _report("imports against the one-way flow", offenders)


def test_no_import_cycle_between_files():
    """Depth-first search over the files' imports (function-local ones too: a cycle moved into a function is still
    a cycle); every cycle found is reported."""
    graph = {m: {t for _, t in _imports(m) if t in MODULES and t != m} for m in MODULES}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    _report("import cycles between files", cycles)


def _ratchet(found: dict[str, str], kind: str) -> list[str]:
    """The offenders not in KNOWN_LONG, plus the KNOWN_LONG entries of this ``kind`` that no longer offend."""
    known = {k for k in KNOWN_LONG if (":" in k) == (kind == "function")}
    return [msg for key, msg in found.items() if key not in known] + \
        [f"{k}: listed in KNOWN_LONG but no longer too long: remove it" for k in sorted(known - set(found))]


def test_module_length():
    found = {str(path.relative_to(ROOT)): f"{path.relative_to(ROOT)}: {n} lines (at most {MAX_MODULE_LINES})"
             for path in MODULES.values() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    _report("modules too long", _ratchet(found, "module"))


def test_function_length():
    found = {}
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    found[f"{MODULES[module].relative_to(ROOT)}:{node.name}"] = \
                        f"{_where(module, node)}: {node.name}() is {n} lines (at most {MAX_FUNCTION_LINES})"
    _report("functions too long", _ratchet(found, "function"))


def _module_names(module: str) -> dict[str, str]:
    """``{local name: ktnas module}`` of the names ``module``'s imports bind to ktnas modules (any scope)."""
    names = {}
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ktnas":
                    names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "ktnas"
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    names[alias.asname or alias.name] = f"{target}.{alias.name}"
    return names


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def test_no_private_names_across_modules():
    offenders = []
    for module, tree in TREES.items():
        bound = _module_names(module)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                if node.level or target.split(".")[0] == "ktnas":
                    offenders += [f"{_where(module, node)}: imports private {alias.name} from {target}"
                                  for alias in node.names if _is_private(alias.name)]
            elif isinstance(node, ast.Attribute) and _is_private(node.attr):
                chain = _dotted(node.value)
                if chain and chain[0] in bound:
                    owner = ".".join([bound[chain[0]], *chain[1:]])
                    if owner in MODULES:
                        offenders.append(f"{_where(module, node)}: uses private {owner}.{node.attr}")
    _report("private names used across modules", offenders)
