"""precompute-features: the store holds the stem's outputs; kills, Ctrl-C, shards and full disks lose nothing."""
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from conftest import TINY, assert_same_store, ktnas, store_contents, tiny_args
from ktnas.cache import datasets
from ktnas.cache.errors import KtnasError
from ktnas.cache.datasets import augment
from ktnas.cache.precompute import precompute
from ktnas.cache.stems import get_stem
from ktnas.cache.store import open_store


def _pre(out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return precompute(**dict(TINY, out=str(out), **kw))


def _direct(spec, weights, size, images, views=1, seed=0, split="train"):
    """The stem applied directly, sample by sample: the reference the store must hold."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stem = get_stem(spec, weights, size)
    out = []
    with torch.no_grad():
        for i, img in enumerate(images):
            x = stem.prepare(img[None])
            vs = [stem.forward_prepared(x if v == 0 else augment(x, [i], v, seed, split)) for v in range(views)]
            out.append(torch.stack(vs, 1)[0])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("name, dtype, tol", [("s.zarr", "float16", 2e-3), ("s.h5", "float16", 2e-3),
                                              ("s.zarr", "float32", 1e-5), ("s.h5", "float32", 1e-5)])
def test_store_holds_the_stems_direct_outputs(tmp_path, name, dtype, tol):
    summary = _pre(tmp_path / name, dtype=dtype, views=2, limit=90)
    assert summary["complete"] and summary["chunks_written"] == 6  # 90 per split, chunks of 40
    data = datasets.load_split("synthetic:400/160", "test")
    got = store_contents(tmp_path / name)
    feats, labels, written = got["test"]
    assert feats.dtype == np.dtype(dtype) and feats.shape == (90, 2, 16, 16, 16) and written.all()
    ref = _direct(TINY["stem"], "none", 32, data.images[:90], views=2, split="test")
    np.testing.assert_allclose(feats.astype(np.float32), ref, rtol=tol, atol=tol)
    np.testing.assert_array_equal(labels, data.labels[:90].numpy())
    assert not np.array_equal(feats[:, 0], feats[:, 1])  # view 1 is augmented
    a = got["attrs"]
    assert a["stem"] == TINY["stem"] and a["complete"] and a["views"] == 2 and a["dtype"] == dtype
    assert a["preprocessing"]["image_size"] == 32 and a["dataset_fingerprints"]["test"] == data.fingerprint
    assert len(a["stem_fingerprint"]) == 64 and "torch" in a["versions"]


def test_real_fashion_mnist_through_the_real_imagenet_mobilenet_v2(tmp_path):
    """The embedded default, on a slice: real images, real pretrained weights, the store equals the stem."""
    out = tmp_path / "fm.zarr"
    precompute(out=str(out), limit=200, progress=False)  # defaults: fashion-mnist, mobilenet_v2:features.3, 64 px
    data = datasets.load_split("fashion-mnist", "train")
    feats, labels, _ = store_contents(out)["train"]
    assert feats.shape == (200, 1, 24, 16, 16)
    ref = _direct("mobilenet_v2:features.3", "imagenet", 64, data.images[:200])
    np.testing.assert_allclose(feats.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(labels, data.labels[:200].numpy())
    with open_store(out) as s:
        assert "IMAGENET1K_V1" in s.attrs["weights"] and s.attrs["num_classes"] == 10


def test_rerun_is_identical_and_refuses_to_touch_an_existing_store(tmp_path):
    _pre(tmp_path / "a.zarr", views=3)
    _pre(tmp_path / "b.zarr", views=3)
    assert_same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")
    before = store_contents(tmp_path / "a.zarr")
    with pytest.raises(KtnasError, match="already exists: pass --resume to continue it or --overwrite"):
        _pre(tmp_path / "a.zarr", views=3)
    with pytest.raises(KtnasError, match=r"cannot resume .* another .*views \(3 there, 2 now\)"):
        _pre(tmp_path / "a.zarr", views=2, resume=True)
    assert_same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")  # refusals touched nothing
    assert store_contents(tmp_path / "a.zarr")["attrs"] == before["attrs"]
    s = _pre(tmp_path / "a.zarr", views=3, resume=True)  # complete: nothing to do
    assert s["chunks_written"] == 0 and s["chunks_skipped"] == 14
    s = _pre(tmp_path / "a.zarr", views=1, overwrite=True)
    assert s["chunks_written"] == 14 and store_contents(tmp_path / "a.zarr")["attrs"]["views"] == 1


def _wait_for_chunks(path, n, proc, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, "precompute finished before it could be interrupted"
        try:
            with open_store(path, require_complete=False) as s:
                if s.written_counts()[0] >= n:
                    return
        except KtnasError:
            pass
        time.sleep(0.02)
    raise AssertionError("no chunk written in time")


@pytest.mark.parametrize("name, sig", [("k.zarr", signal.SIGKILL), ("k.h5", signal.SIGINT),
                                       ("i.zarr", signal.SIGINT)])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, name, sig):
    """The poll below reads the store while it is written: that must not disturb the writer either."""
    kw = dict(dataset="synthetic:1600/400", chunk_size=8, batch_size=8, views=2)  # 250 chunks: >1 s of writing
    _pre(tmp_path / ("ref" + name[1:]), **kw)
    out = tmp_path / name
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "ktnas.engine.cli", *tiny_args(out, **kw)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_chunks(out, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "rerun the same command with --resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    with open_store(out, require_complete=False) as s:
        done, total = s.written_counts()
        assert 3 <= done < total and not s.complete
    with pytest.raises(KtnasError, match="incomplete"):
        open_store(out)
    r = ktnas(*tiny_args(out, resume=True, **kw))
    assert f"skipped {done} already written" in r.stdout
    assert_same_store(out, tmp_path / ("ref" + name[1:]))


@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_sharded_writers_equal_a_single_writer(tmp_path, name):
    _pre(tmp_path / ("one" + name[1:]))
    out = tmp_path / name
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-m", "ktnas.engine.cli", *tiny_args(out, shard=f"{i}/3")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert_same_store(out, tmp_path / ("one" + name[1:]))


def test_store_is_complete_only_when_every_shard_is_done(tmp_path):
    out = tmp_path / "s.zarr"
    s0 = _pre(out, shard=(0, 2))
    assert not s0["complete"]
    with open_store(out, require_complete=False) as s:
        assert list(s.split("train").written()) == [True, False] * 5
    s1 = _pre(out, shard=(1, 2))
    assert s1["complete"] and s1["chunks_written"] == 7
    _pre(tmp_path / "one.zarr")
    assert_same_store(out, tmp_path / "one.zarr")


def test_torchrun_ranks_write_their_shards(tmp_path):
    out = tmp_path / "t.zarr"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "ktnas.engine.cli",
                        *tiny_args(out)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _pre(tmp_path / "one.zarr")
    assert_same_store(out, tmp_path / "one.zarr")


def test_nan_features_are_refused_before_anything_bad_is_written(tmp_path):
    import torchvision

    model = torchvision.models.mobilenet_v2()
    sd = model.state_dict()
    sd["features.0.0.weight"][0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    out = tmp_path / "n.zarr"
    r = ktnas(*tiny_args(out, weights=tmp_path / "nan.pth"), check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("ktnas: error: stem mobilenet_v2:features.1 produced NaN/Inf")
    assert "Traceback" not in r.stderr
    with open_store(out, require_complete=False) as s:
        assert s.written_counts()[0] == 0 and not s.complete


def test_float16_overflow_suggests_float32(tmp_path):
    import torchvision

    sd = torchvision.models.mobilenet_v2().state_dict()
    sd["features.1.conv.1.weight"] *= 1e6  # the linear bottleneck: finite in float32, beyond float16
    torch.save(sd, tmp_path / "big.pth")
    with pytest.raises(KtnasError, match="use --dtype float32"):
        _pre(tmp_path / "o.zarr", weights=str(tmp_path / "big.pth"))
    _pre(tmp_path / "o32.zarr", weights=str(tmp_path / "big.pth"), dtype="float32")


def test_disk_full_mid_write_stops_clearly_and_resumes(tmp_path, monkeypatch):
    from ktnas.cache.store import StoreSplit

    _pre(tmp_path / "ref.zarr")
    real, calls = StoreSplit.write_chunk, []

    def flaky(self, i, f, y):
        calls.append(i)
        if len(calls) == 4:
            import errno
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, i, f, y)

    monkeypatch.setattr(StoreSplit, "write_chunk", flaky)
    with pytest.raises(KtnasError, match="disk full .* --resume"):
        _pre(tmp_path / "d.zarr")
    monkeypatch.setattr(StoreSplit, "write_chunk", real)
    with open_store(tmp_path / "d.zarr", require_complete=False) as s:
        assert s.written_counts()[0] == 3
    s = _pre(tmp_path / "d.zarr", resume=True)
    assert s["chunks_skipped"] == 3 and s["complete"]
    assert_same_store(tmp_path / "d.zarr", tmp_path / "ref.zarr")


def test_a_really_full_disk(tmp_path):
    """A real small file system: the run stops with the one-line error, and resumes once space is freed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (3 << 19))  # 1.5 MiB: about 0.5 MiB left
        kw = dict(compressor="none", dtype="float32", limit=40, chunk_size=10)  # 8 chunks of 160 KiB: 1.3 MiB
        out = mnt / "s.zarr"
        r = ktnas(*tiny_args(out, **kw), check=False)
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("ktnas: error: disk full while writing") and "--resume" in last
        with open_store(out, require_complete=False) as s:
            written = s.written_counts()[0]
        assert written >= 1
        filler.unlink()
        r = ktnas(*tiny_args(out, resume=True, **kw))
        assert f"skipped {written} already written" in r.stdout
        _pre(tmp_path / "ref.zarr", **kw)
        assert_same_store(out, tmp_path / "ref.zarr")
    finally:
        subprocess.run(["umount", str(mnt)])


def test_cli_errors_are_one_line(tmp_path):
    for args, msg in [(["--stem", "resnet99:layer1"], "unknown stem architecture"),
                      (["--dataset", "mnist42"], "unknown dataset"),
                      (["--shard", "3/2"], "bad --shard"),
                      *([(["--device", "cuda"], "no CUDA device")] if not torch.cuda.is_available() else [])]:
        r = ktnas(*tiny_args(tmp_path / "e.zarr"), *args, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = [l for l in r.stderr.strip().splitlines() if l.startswith("ktnas: error")]
        assert len(lines) == 1 and msg in lines[0]
