"""Progress written to a log (standard error not a terminal): a line every KTNAS_PROGRESS_INTERVAL seconds and
when a bar ends, never a redraw per step (a redrawn bar in a log is a line per step)."""

import io
import re
import warnings

import pytest
from conftest import ktnas

from ktnas.cache.runtime import progress


DARTS_V2 = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
            "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
            "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
            "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
            "('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")


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
    r = ktnas("train", "--features", store, "--genotype", DARTS_V2, "--out", tmp_path / "run",
              "--epochs", "2", "--batch-size", "2", "--limit", "64", "--layers", "2", "--channels", "4",
              "--device", "cpu")
    lines = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) <= 2 * 6 + 4, r.stderr[-3000:]


# ------------------------------------------------------------------ the other commands that draw bars, to a log
_BAR = re.compile(r"\d+(?:\.\d+)?[kM]?/\d+(?:\.\d+)?[kM]? \[")  # tqdm's "n/total [" (96.0/96.0 with unit_scale)


def _bar_lines(stderr: str, desc: str) -> list[str]:
    """The lines (``\\r`` or ``\\n`` ended) that draw the bar named ``desc``."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if desc in line and _BAR.search(line)]


def _assert_bounded(stderr: str, ends: dict) -> None:
    """Each bar (desc: a count its lines must show, its end "64/64" for a bar that stays) was drawn, in at most 3
    lines (start, end and a timed one: these runs take seconds, the interval is 30 s), and no other bar was; a line
    per step or per postfix update would be dozens."""
    for desc, end in ends.items():
        bars = _bar_lines(stderr, desc)
        assert any(end in line for line in bars), (desc, stderr[-3000:])
        assert len(bars) <= 3, (desc, len(bars), stderr[-3000:])
    assert len(_bar_lines(stderr, "")) <= 3 * len(ends), stderr[-3000:]


@pytest.fixture(scope="module")
def chunked_store(tmp_path_factory):
    """64 train and 32 test synthetic images, one per chunk: a bar over chunks has 96 steps."""
    from ktnas.cache.precompute import precompute

    out = tmp_path_factory.mktemp("progress-store") / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random stem weights
        precompute(dataset="synthetic:64/32", stem="mobilenet_v2:features.1", weights="none", image_size=32,
                   out=str(out), chunk_size=1, progress=False)
    return out


def test_precompute_logged_to_a_file_is_bounded(tmp_path):
    """96 chunks of one image each, a bar update per chunk: its start and end lines only."""
    r = ktnas("precompute-features", "--dataset", "synthetic:64/32", "--stem", "mobilenet_v2:features.1",
              "--weights", "none", "--image-size", "32", "--chunk-size", "1", "--batch-size", "8",
              "--device", "cpu", "--out", tmp_path / "s.zarr")
    _assert_bounded(r.stderr, {"precompute mobilenet_v2:features.1": "96.0/96.0"})


def test_inspect_verify_logged_to_a_file_is_bounded(chunked_store):
    """--verify reads 64 and 32 chunks, a bar per split."""
    r = ktnas("inspect", chunked_store, "--verify")
    _assert_bounded(r.stderr, {"verify train": "64/64", "verify test": "32/32"})


def test_evaluate_logged_to_a_file_is_bounded(chunked_store, tmp_path):
    """64 images one batch each."""
    ktnas("train", "--features", chunked_store, "--genotype", DARTS_V2, "--out", tmp_path / "run", "--epochs", "1",
          "--batch-size", "16", "--limit", "64", "--layers", "2", "--channels", "4", "--device", "cpu", "--quiet")
    r = ktnas("evaluate", "--model", tmp_path / "run" / "model.pt", "--split", "train", "--limit", "64",
              "--batch-size", "1", "--device", "cpu")
    _assert_bounded(r.stderr, {"evaluate": "64/64"})


def test_evolve_logged_to_a_file_is_bounded(chunked_store, tmp_path):
    """The predictor's pre-training bar (100 steps, a postfix each) and the evolve bar (8 candidates, a postfix
    each)."""
    r = ktnas("evolve", "--features", chunked_store, "--out", tmp_path / "run", "--space", "nb201",
              "--algo", "predictor", "--population", "4", "--sample", "2", "--cycles", "4", "--layers", "3",
              "--channels", "4", "--epochs-per-candidate", "1", "--batch-size", "16", "--limit", "64",
              "--pretrain-archs", "32", "--pretrain-steps", "100", "--fit-steps", "10", "--pool", "5",
              "--hidden", "8", "--cv-folds", "0", "--device", "cpu")
    # the pre-training bar does not stay (leave=False): its start line shows, its end clears it
    _assert_bounded(r.stderr, {"predictor pre-training": "0/100", "evolve predictor": "8/8"})
