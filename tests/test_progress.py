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


def test_postfix_updates_wait_for_the_next_timed_line():
    """A loop that sets its bar's postfix every step (a running loss) prints, to a log, its start and end only;
    the last postfix shows in the end line."""
    f = io.StringIO()
    bar = progress(range(500), desc="epoch", file=f)
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
        bar.set_description(f"epoch {i % 3}")
    bar.close()
    assert _updates(f.getvalue()) <= 3 and "loss=0.002" in f.getvalue(), f.getvalue()


def test_train_logged_to_a_file_is_bounded(tmp_path):
    """`ktnas train` with its standard error in a file: per epoch its batch bars' start and end lines and the epoch
    bar's, never a line per postfix update (the bars update theirs every few batches)."""
    import warnings

    from ktnas.cache.precompute import precompute

    store = tmp_path / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random stem weights
        precompute(dataset="synthetic:64/32", stem="mobilenet_v2:features.1", weights="none", image_size=32,
                   out=str(store), progress=False)
    darts_v2 = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
                "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
                "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
                "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
                "('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")
    r = ktnas("train", "--features", store, "--genotype", darts_v2, "--out", tmp_path / "run",
              "--epochs", "2", "--batch-size", "2", "--limit", "64", "--layers", "2", "--channels", "4",
              "--device", "cpu")
    lines = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) <= 2 * 6 + 4, r.stderr[-3000:]
