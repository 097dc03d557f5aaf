"""MkDocs hook: lets mkdocstrings find the ``ktnas.*`` packages, which live in top-level folders (``engine/``,
``cache/``, ``kernels/``, ``bench/``) mapped to ``ktnas.*`` by pyproject.toml. It links them under
``build/api/ktnas/`` before the build, so the API pages are read from the sources, not from an install."""
from pathlib import Path

from mkdocs.plugins import event_priority

PACKAGES = ("engine", "cache", "kernels", "bench")


@event_priority(100)  # before mkdocstrings reads its paths
def on_config(config):
    root = Path(config.config_file_path).resolve().parent
    pkg = root / "build" / "api" / "ktnas"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = pkg / name
        if not link.is_symlink():
            link.symlink_to(root / name, target_is_directory=True)
    return config
