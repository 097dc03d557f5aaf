"""The code's shape, read from the source (nothing imported): DESIGN.md's one-way import flow, the size limits,
and no private name used outside its module."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "kernels", "engine", "bench")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
# what each package may import of the others (cache <- engine -> kernels; bench -> everything; nothing -> bench)
ALLOWED = {"cache": set(), "kernels": set(), "engine": {"cache", "kernels"}, "bench": {"cache", "kernels", "engine"}}


def modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT / pkg).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join(["ktnas", pkg, *parts])
            is_pkg = path.name == "__init__.py"
            yield pkg, name, is_pkg, path, ast.parse(path.read_text(), str(path))


def imported(name: str, is_pkg: bool, node: ast.AST):
    """(absolute module name, names imported from it) of an import statement; relative imports resolved."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names]
    if node.level:
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [(mod, [a.name for a in node.names])]


def test_imports_follow_the_one_way_flow():
    bad = []
    for pkg, name, is_pkg, path, tree in modules():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for mod, _ in imported(name, is_pkg, node):
                parts = mod.split(".")
                if parts[0] == "ktnas" and len(parts) > 1 and parts[1] != pkg and parts[1] not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {pkg} imports {mod}")
    assert not bad, "imports against DESIGN.md's one-way flow:\n" + "\n".join(bad)


def test_modules_and_functions_are_small():
    bad = []
    for _, _, _, path, tree in modules():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            bad.append(f"{path.relative_to(ROOT)}: {lines} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} has {n} lines "
                               f"(limit {MAX_FUNCTION_LINES})")
    assert not bad, "too large:\n" + "\n".join(bad)


def _private(n: str) -> bool:
    return n.startswith("_") and not n.startswith("__")


def test_no_private_name_crosses_a_module():
    bad = []
    for _, name, is_pkg, path, tree in modules():
        aliases = {}  # local names bound to ktnas modules
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for mod, names in imported(name, is_pkg, node):
                    if not mod.startswith("ktnas"):
                        continue
                    for n in names:
                        if _private(n):
                            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {n} from {mod}")
                    if isinstance(node, ast.ImportFrom):
                        aliases.update({a.asname or a.name: f"{mod}.{a.name}" for a in node.names})
                    else:
                        aliases.update({a.asname or a.name.split(".")[0]: a.name for a in node.names})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr) \
                    and node.value.id in aliases and aliases[node.value.id].startswith("ktnas"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: uses {node.value.id}.{node.attr}")
    assert not bad, "private names used outside their module:\n" + "\n".join(bad)


def test_the_checks_see_the_packages():
    """The walk above reads every package (an empty walk would pass every check)."""
    names = {name for _, name, _, _, _ in modules()}
    assert {"ktnas.engine.search", "ktnas.engine.spaces.darts", "ktnas.engine.algorithms.gdas",
            "ktnas.kernels.mixed", "ktnas.cache.store", "ktnas.bench.step"} <= names
    assert imported("ktnas.engine.spaces.darts", False, ast.parse("from ..ops import OPS").body[0]) == \
        [("ktnas.engine.ops", ["OPS"])]
    assert imported("ktnas.engine.spaces", True, ast.parse("from .base import x").body[0]) == \
        [("ktnas.engine.spaces.base", ["x"])]
