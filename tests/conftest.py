"""Shared helpers: a tiny, fast precompute configuration and a way to run the `ktnas` command."""
import os
import subprocess
import sys

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one process per core (pytest-xdist): one thread each, in the tests' own processes and in the ones they start
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    # the fused Triton kernels run on CPU tensors through Triton's interpreter (read when triton is imported)
    os.environ["TRITON_INTERPRET"] = "1"
# fix the mode now (triton reads it at import, its kernels when they are defined): a test that flips
# TRITON_INTERPRET later must not decide it for the whole session
import ktnas.kernels.triton_mixed  # noqa: E402,F401

import numpy as np
import pytest

# a small, fast stem and data set: most tests only need real stem outputs of a few hundred images
TINY = dict(dataset="synthetic:400/160", stem="mobilenet_v2:features.1", weights="none", image_size=32,
            chunk_size=40, batch_size=16, progress=False)


def interrupt_search_at(monkeypatch, epoch: int):
    """Make every search raise KeyboardInterrupt when its epoch ``epoch`` (0-based) starts, as if killed there;
    returns a function that undoes it."""
    from ktnas.engine.search.run import SearchRun

    real = SearchRun.train_epoch

    def killed(self, e, *a):
        if e == epoch:
            raise KeyboardInterrupt
        return real(self, e, *a)

    monkeypatch.setattr(SearchRun, "train_epoch", killed)
    return lambda: monkeypatch.setattr(SearchRun, "train_epoch", real)


def tiny_args(out, **kw):
    """CLI arguments equal to TINY (plus overrides given as flag=value)."""
    d = dict(TINY, out=str(out), **kw)
    args = ["precompute-features"]
    for k, v in d.items():
        if k == "progress":
            args += [] if v else ["--quiet"]
        elif v is True:
            args.append("--" + k.replace("_", "-"))
        elif v is not False and v is not None:
            args += ["--" + k.replace("_", "-"), str(v)]
    return args


def ktnas(*args, check=True, env=None, **popen):
    """Run `python -m ktnas.engine.cli ARGS` in a subprocess; returns CompletedProcess (text)."""
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    r = subprocess.run([sys.executable, "-m", "ktnas.engine.cli", *map(str, args)], capture_output=True,
                       text=True, env=e, **popen)
    if check and r.returncode != 0:
        raise AssertionError(f"ktnas {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def one_line_error(fn, *match):
    """``fn()`` raises a KtnasError of one line that contains every string in ``match``; returns the message."""
    from ktnas.cache.errors import KtnasError

    with pytest.raises(KtnasError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(m in msg for m in match), msg
    return msg


def store_contents(path):
    """Everything a store holds: attrs and, per split, features, labels and written flags (numpy)."""
    from ktnas.cache.store import open_store

    with open_store(path, require_complete=False) as s:
        out = {"attrs": dict(s.attrs)}
        for name in s.splits:
            sp = s.split(name)
            feats = np.concatenate([sp.read_chunk(i)[0] for i in range(sp.num_chunks)])
            out[name] = (feats, sp.read_labels(), sp.written())
        return out


def assert_same_store(a, b, ignore_attrs=("backend",)):
    ca, cb = store_contents(a), store_contents(b)
    ka = {k: v for k, v in ca.pop("attrs").items() if k not in ignore_attrs}
    kb = {k: v for k, v in cb.pop("attrs").items() if k not in ignore_attrs}
    assert ka == kb
    assert ca.keys() == cb.keys()
    for name in ca:
        for x, y in zip(ca[name], cb[name]):
            np.testing.assert_array_equal(x, y)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test reaches for the network: ImageNet weights come from the hub cache or offline copies only."""
    monkeypatch.setenv("KTNAS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def search_store(tmp_path_factory):
    """A tiny store to search on: 64 synthetic images through an untrained mobilenet_v2:features.1 (16x16)."""
    from ktnas.cache.precompute import precompute

    out = tmp_path_factory.mktemp("search-store") / "s.zarr"
    with pytest.warns(UserWarning):
        precompute(dataset="synthetic:200/80", stem="mobilenet_v2:features.1", weights="none", image_size=32,
                   out=str(out), limit=64, splits=("train",), progress=False)
    return str(out)


# The files that take longest (half a minute to a few minutes of one worker each), longest first: they run before
# the others, so that under pytest-xdist (make test: --dist loadfile) the short files fill in at the end instead of
# a long file running alone after the other worker is done. The other files follow in pytest-xdist's own order
# (most tests first).
LONGEST = ("test_bench_step.py", "test_bench_accuracy.py", "test_precompute.py", "test_search_ddp.py",
           "test_capture.py", "test_memory.py", "test_supernet.py", "test_triton_mixed.py", "test_bench_search.py",
           "test_evolve.py", "test_evaluate_classes.py", "test_progress.py", "test_cli.py", "test_doctor.py",
           "test_bench_kernels.py", "test_bench_evolve.py", "test_schedule.py", "test_bench_small_budget.py",
           "test_genotypes.py", "test_search.py", "test_stems.py", "test_triton_op.py", "test_docs.py",
           "test_budget.py", "test_latency.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # pytest-xdist keeps the order pytest_collection_modifyitems makes


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the files in their usual order
    files = [item.nodeid.split("::")[0] for item in items]
    count = {f: files.count(f) for f in set(files)}

    def rank(f):
        name = os.path.basename(f)
        return (LONGEST.index(name) if name in LONGEST else len(LONGEST), -count[f], f)

    order = {f: i for i, f in enumerate(sorted(count, key=rank))}
    items[:] = [item for _, item in sorted(zip(files, items), key=lambda p: order[p[0]])]  # stable within a file
