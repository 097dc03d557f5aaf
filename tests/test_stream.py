"""FeatureLoader: epoch order, chunk-aligned reads, subsets, ranks, views, in-memory parity, errors, threads."""
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

from ktnas.cache.errors import KtnasError
from ktnas.cache.store import StoreSplit, create_store, open_store
from ktnas.cache.stream import FeatureLoader

N, CHUNK, SHAPE = 103, 10, (2, 3, 3)
BACKENDS = ["x.zarr", "x.h5"]


def make_store(path, n=N, views=1, complete=True, fingerprint="f" * 64):
    """Float16 features[i, v] = i + v / 4 everywhere (exact for i < 512), labels[i] = i % 7."""
    st = create_store(path, attrs={"stem": "toy", "stem_fingerprint": fingerprint},
                      splits={"train": (n, views, *SHAPE)}, dtype="float16", chunk_size=CHUNK)
    sp = st.split("train")
    for c in range(sp.num_chunks if complete else sp.num_chunks - 1):
        s, e = sp.chunk_range(c)
        idx = np.arange(s, e)
        val = idx[:, None] + np.arange(views)[None, :] / 4
        sp.write_chunk(c, np.broadcast_to(val[:, :, None, None, None], (e - s, views, *SHAPE)), idx % 7)
    st.mark_complete_if_done()
    st.close()
    return str(path)


@pytest.fixture(params=BACKENDS)
def store1(request, tmp_path):
    return make_store(tmp_path / request.param)


@pytest.fixture(params=BACKENDS)
def store3(request, tmp_path):
    return make_store(tmp_path / request.param, views=3)


def decode(batch):
    """(sample indices, views) of a batch, after checking each sample is uniform and its label matches."""
    feats, labels = batch
    flat = feats.reshape(len(feats), -1)
    assert torch.equal(flat, flat[:, :1].expand_as(flat))
    x = flat[:, 0].double()
    idx = x.floor().long()
    assert torch.equal(labels, idx % 7)
    return idx.tolist(), ((x - idx) * 4).long().tolist()


def run(loader, epoch=0):
    """Every batch's (indices, views) of one epoch, as lists of lists."""
    loader.set_epoch(epoch)
    out = [decode(b) for b in loader]
    return [i for i, _ in out], [v for _, v in out]


def flat(lists):
    return [x for lst in lists for x in lst]


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_sample_once_last_batch_short(store1, shuffle):
    with FeatureLoader(store1, batch_size=16, shuffle=shuffle, in_memory=False) as ld:
        assert ld.num_samples == N and len(ld) == 7 and ld.sample_shape == SHAPE and ld.num_classes == 7
        feats, labels = next(iter(ld))
        assert feats.dtype == torch.float32 and feats.device.type == "cpu" and feats.shape == (16, *SHAPE)
        assert labels.dtype == torch.int64
        idx, _ = run(ld)
    assert [len(b) for b in idx] == [16] * 6 + [7]
    assert sorted(flat(idx)) == list(range(N))
    assert (flat(idx) == list(range(N))) == (not shuffle)


def test_drop_last_and_dtype(store1):
    with FeatureLoader(store1, batch_size=16, drop_last=True, dtype=torch.float16) as ld:
        assert len(ld) == 6
        batches = list(ld)
        assert all(f.dtype == torch.float16 and len(f) == 16 for f, _ in batches)
        idx = flat(decode(b)[0] for b in batches)
    assert len(idx) == 96 and len(set(idx)) == 96


def test_epochs_differ_and_reproduce(store1):
    a = FeatureLoader(store1, batch_size=8, in_memory=False)
    b = FeatureLoader(store1, batch_size=8, in_memory=False)
    c = FeatureLoader(store1, batch_size=8, in_memory=False, seed=1)
    e0, e1 = run(a, 0)[0], run(a, 1)[0]
    assert e0 != e1 and sorted(flat(e0)) == sorted(flat(e1)) == list(range(N))
    assert run(b, 1)[0] == e1 and run(a, 0)[0] == e0
    assert run(c, 1)[0] != e1
    for ld in (a, b, c):
        ld.close()


@pytest.fixture
def count_reads(monkeypatch):
    """Counter of StoreSplit.read_chunk calls per chunk (the reader threads call it concurrently)."""
    counts, lock, real = Counter(), threading.Lock(), StoreSplit.read_chunk

    def counted(self, i, check=False):
        with lock:
            counts[i] += 1
        return real(self, i, check)

    monkeypatch.setattr(StoreSplit, "read_chunk", counted)
    return counts


def test_reads_are_chunk_aligned(store1, count_reads):
    with FeatureLoader(store1, batch_size=7, chunks_per_group=2, in_memory=False, workers=3) as ld:
        run(ld, 0)
        assert count_reads == {c: 1 for c in range(11)}
        run(ld, 1)
        assert count_reads == {c: 2 for c in range(11)}
    count_reads.clear()
    subset = [3, 4, 55, 57, 101]
    with FeatureLoader(store1, indices=subset, batch_size=2, in_memory=False) as ld:
        assert sorted(flat(run(ld)[0])) == subset
    assert count_reads == {0: 1, 5: 1, 10: 1}
    # a shuffle buffer of one chunk keeps each chunk's samples contiguous in the order
    with FeatureLoader(store1, batch_size=5, chunks_per_group=1, in_memory=False) as ld:
        chunks = [i // CHUNK for i in flat(run(ld, 3)[0])]
    runs = [c for k, c in enumerate(chunks) if k == 0 or c != chunks[k - 1]]
    assert sorted(runs) == list(range(11))


def test_subset_indices(store1):
    rng = np.random.default_rng(0)
    subset = rng.choice(N, size=40, replace=False)
    for mem in (False, True):
        with FeatureLoader(store1, indices=subset, batch_size=6, in_memory=mem) as ld:
            assert ld.num_samples == 40 and len(ld) == 7
            assert sorted(flat(run(ld)[0])) == sorted(subset.tolist())
    with FeatureLoader(store1, indices=torch.tensor([5, 1]), shuffle=False, batch_size=4) as ld:
        assert run(ld)[0] == [[1, 5]]
    for bad in ([1, 2, 2], [0, N], [-1, 3], [[1, 2]], [0.5]):
        with pytest.raises(KtnasError):
            FeatureLoader(store1, indices=bad)


@pytest.mark.parametrize("n,world", [(103, 2), (103, 3), (102, 2), (102, 3)])
@pytest.mark.parametrize("in_memory", [False, True])
def test_ranks(store1, n, world, in_memory):
    per_rank = []
    for r in range(world):
        with FeatureLoader(store1, indices=range(n), rank=r, world_size=world, batch_size=8,
                           in_memory=in_memory) as ld:
            idx = run(ld, 2)[0]
            assert len(idx) == len(ld) and len(flat(idx)) == ld.num_samples == -(-n // world)
            per_rank.append(flat(idx))
    allv = flat(per_rank)
    assert set(allv) == set(range(n))
    assert len(allv) - n == (-n) % world  # only the wrap-around padding repeats
    if n % world == 0:
        assert len(set(allv)) == len(allv)


def test_views_random(store3):
    with FeatureLoader(store3, batch_size=16, in_memory=False) as s, \
            FeatureLoader(store3, batch_size=16, in_memory=True) as m:
        assert not s.in_memory and m.in_memory
        views = {}
        for e in (0, 1):
            si, sv = run(s, e)
            mi, mv = run(m, e)
            assert (si, sv) == (mi, mv)
            views[e] = dict(zip(flat(si), flat(sv)))
        assert set(views[0].values()) == {0, 1, 2}
        assert views[0] != views[1]
        # rank-independent: a sample's view is the same when the epoch is split over two ranks
        for r in range(2):
            with FeatureLoader(store3, rank=r, world_size=2, batch_size=16, in_memory=False) as ld:
                ri, rv = run(ld, 1)
                assert all(views[1][i] == v for i, v in zip(flat(ri), flat(rv)))


def test_view_fixed_and_invalid(store3):
    for mem in (False, True):
        with FeatureLoader(store3, view=2, batch_size=32, in_memory=mem) as ld:
            idx, views = run(ld)
        assert sorted(flat(idx)) == list(range(N)) and set(flat(views)) == {2}
    for bad in (3, -1, "first"):
        with pytest.raises(KtnasError):
            FeatureLoader(store3, view=bad)


def test_in_memory_matches_streaming(store3, count_reads):
    kw = dict(batch_size=9, chunks_per_group=3, seed=5)
    with FeatureLoader(store3, in_memory=True, **kw) as m, FeatureLoader(store3, in_memory=False, **kw) as s:
        for e in (0, 1, 4):
            m.set_epoch(e)
            s.set_epoch(e)
            mb, sb = list(m), list(s)
            assert len(mb) == len(sb) == len(m) == 12
            for (mf, ml), (sf, sl) in zip(mb, sb):
                assert torch.equal(mf, sf) and torch.equal(ml, sl)
    assert count_reads == {c: 1 + 3 for c in range(11)}  # in-memory read each chunk once, streaming per epoch


def test_auto_in_memory(store1):
    nbytes = N * int(np.prod(SHAPE)) * 2
    with FeatureLoader(store1, memory_budget=nbytes) as a, FeatureLoader(store1, memory_budget=nbytes - 1) as b, \
            FeatureLoader(store1, indices=range(50), memory_budget=nbytes // 2) as c:
        assert a.in_memory and not b.in_memory and c.in_memory
        assert sorted(flat(run(a)[0])) == sorted(flat(run(b)[0])) == list(range(N))


def test_store_object_and_errors(tmp_path, store1):
    st = open_store(store1)
    with FeatureLoader(st, batch_size=50, expect_fingerprint="f" * 64) as ld:
        assert sorted(flat(run(ld)[0])) == list(range(N))
    with pytest.raises(KtnasError, match="another stem"):
        FeatureLoader(st, expect_fingerprint="0" * 64)
    st.close()
    with pytest.raises(KtnasError, match="another stem"):
        FeatureLoader(store1, expect_fingerprint="0" * 64)
    with pytest.raises(KtnasError, match="incomplete"):
        FeatureLoader(make_store(tmp_path / "part.zarr", complete=False))
    part = open_store(tmp_path / "part.zarr", require_complete=False)  # an open, unfinished store
    with pytest.raises(KtnasError, match="has not written chunk 10"):
        FeatureLoader(part)
    with FeatureLoader(part, indices=range(100), batch_size=64) as ld:  # its written chunks are usable
        assert sorted(flat(run(ld)[0])) == list(range(100))
    part.close()
    with pytest.raises(KtnasError, match="no split"):
        FeatureLoader(store1, split="val")
    for kw in (dict(rank=2, world_size=2), dict(rank=-1), dict(batch_size=0), dict(in_memory="yes")):
        with pytest.raises(KtnasError):
            FeatureLoader(store1, **kw)


def reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("ktnas-reader", "ktnas-assembler"))]


def wait_no_threads(timeout=5.0):
    end = time.monotonic() + timeout
    while reader_threads() and time.monotonic() < end:
        time.sleep(0.02)
    return not reader_threads()


def test_reader_error_propagates(store1, monkeypatch):
    real = StoreSplit.read_chunk

    def failing(self, i, check=False):
        if i == 5:
            raise KtnasError("chunk 5 is broken: repair the store")
        time.sleep(0.05 if i > 5 else 0)  # the reads queued after the broken one are still in flight
        return real(self, i, check)

    monkeypatch.setattr(StoreSplit, "read_chunk", failing)
    for mem in (False, True):
        with FeatureLoader(store1, batch_size=8, in_memory=mem, chunks_per_group=1, workers=3, prefetch=3) as ld:
            with pytest.raises(KtnasError, match="chunk 5 is broken"):
                list(ld)
            # no thread of the failed iteration outlives the error: no store read runs while it is reported
            assert not reader_threads()


def test_break_early_then_iterate_again(store1):
    with FeatureLoader(store1, batch_size=4, in_memory=False, chunks_per_group=1, prefetch=2) as ld:
        for _ in ld:
            break
        assert sorted(flat(run(ld)[0])) == list(range(N))
        it = iter(ld)
        next(it)
    assert not reader_threads()  # close() stops the iteration left open and waits for its threads
    del it


@pytest.mark.parametrize("name", BACKENDS)
def test_loader_refuses_nan_features_in_one_line(tmp_path, name):
    """NaN features in a store are named as such when they are read, not later as a diverged training."""
    path = make_store(tmp_path / name)
    with open_store(path, "a") as st:
        sp = st.split("train")
        f, y = sp.read_chunk(3)
        f[2, 0, 1] = np.nan
        sp.write_chunk(3, f, y)
    for mem in (False, True):
        with FeatureLoader(path, batch_size=8, in_memory=mem) as ld:
            with pytest.raises(KtnasError, match=r"chunk 3 of split 'train' of store .* holds NaN/Inf features: run "
                                                 r"`ktnas inspect .* --verify --repair`") as e:
                list(ld)
        assert "\n" not in str(e.value)


def test_a_deleted_chunk_file_is_refused_not_read_as_zeros(tmp_path):
    path = make_store(tmp_path / "x.zarr")
    (tmp_path / "x.zarr" / "train" / "features" / "c" / "4" / "0" / "0" / "0" / "0").unlink()
    with FeatureLoader(path, batch_size=8, in_memory=False) as ld:
        with pytest.raises(KtnasError, match="chunk 4 of split 'train' .* its data are missing"):
            list(ld)
    from ktnas.cache.store import inspect_store

    rep = inspect_store(path, verify=True)
    assert rep["splits"]["train"]["bad_chunks"] == {4: "is flagged written but its data are missing "
                                                       "(a chunk file was deleted?)"}


def test_a_chunk_of_zeros_is_still_stored(tmp_path):
    """Zarr skips chunks equal to the fill value unless told otherwise: real zero features must not look lost."""
    path = make_store(tmp_path / "z.zarr")
    with open_store(path, "a") as st:
        sp = st.split("train")
        sp.write_chunk(2, np.zeros((CHUNK, 1, *SHAPE), np.float16), np.zeros(CHUNK, np.int64))
    with FeatureLoader(path, batch_size=CHUNK, shuffle=False, in_memory=False) as ld:
        batches = list(ld)
    assert float(batches[2][0].abs().sum()) == 0 and int(batches[3][0][0, 0, 0, 0]) == 30
