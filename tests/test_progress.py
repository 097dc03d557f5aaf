"""Progress written to a log (standard error not a terminal): a line every KTNAS_PROGRESS_INTERVAL seconds and
when a bar ends, never a redraw per step (issue 13: ``make demo > log`` wrote 184 KB of bars)."""

import io

from conftest import ktnas

from ktnas.cache.runtime import progress


def _updates(text: str) -> int:
    return text.count("\r") + text.count("\n")


def test_a_bar_to_a_log_prints_its_start_and_end_only():
    f = io.StringIO()
    for _ in progress(range(20_000), desc="steps", file=f):
        pass
    assert _updates(f.getvalue()) <= 3 and "20000/20000" in f.getvalue()


def test_the_interval_is_the_users(monkeypatch):
    """KTNAS_PROGRESS_INTERVAL=0: every step may print (so the bound above is the interval's doing)."""
    monkeypatch.setenv("KTNAS_PROGRESS_INTERVAL", "0")
    f = io.StringIO()
    for _ in progress(range(200), desc="steps", file=f, miniters=1):
        pass
    assert _updates(f.getvalue()) > 100


def test_quiet_prints_no_bar():
    f = io.StringIO()
    for _ in progress(range(50), desc="steps", file=f, enabled=False):
        pass
    assert f.getvalue() == ""


def test_search_logged_to_a_file_is_bounded(search_store, tmp_path):
    """A two-epoch search with its standard error in a file: a few lines per epoch, not one per step (16 steps
    an epoch here)."""
    r = ktnas("search", "--features", search_store, "--out", tmp_path / "run", "--epochs", "2", "--batch-size", "2",
              "--limit", "64", "--layers", "2", "--channels", "4", "--reductions", "1", "--device", "cpu")
    bars = [line for line in r.stderr.replace("\r", "\n").splitlines() if "search darts epoch" in line]
    assert 2 <= len(bars) <= 8, r.stderr[-2000:]


def test_every_command_with_a_progress_bar_takes_quiet(search_store, tmp_path):
    """The commands that draw bars all take --quiet, and with it a logged run prints no bar at all."""
    import re

    from ktnas.engine.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in ("precompute-features", "inspect", "search", "train", "evaluate", "evolve"):
        assert "--quiet" in sub[name].format_help(), name
    r = ktnas("search", "--features", search_store, "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "8",
              "--limit", "64", "--layers", "2", "--channels", "4", "--reductions", "1", "--device", "cpu", "--quiet")
    assert not re.search(r"\d+/\d+ \[|it/s|s/it", r.stderr), r.stderr[-2000:]
    r = ktnas("inspect", search_store, "--verify", "--quiet")
    assert "verify" not in r.stderr and "chunk/s" not in r.stderr
