"""Stream cached features out of a :class:`~ktnas.cache.store.FeatureStore` into a search, batch by batch.

:class:`FeatureLoader` yields ``(features [B, C, H, W], labels [B])`` on the target device, features cast to
the requested dtype there (the host-to-device copy stays in the stored dtype, e.g. float16, to halve its
bytes) and labels as int64.

Sample order of one epoch (identical in streaming and in-memory mode, so the same seed gives the same
batches, bit for bit):

1. The selected samples (all of the split, or ``indices``, taken in ascending order) are grouped by the
   store chunk that holds them. With ``shuffle`` a generator seeded by ``(seed, epoch)`` permutes those
   chunks, and the order is the concatenation, chunk by chunk, of each chunk's selected samples; without
   ``shuffle`` it is the natural (ascending) order.
2. Rank ``r`` of ``world_size`` W takes the contiguous slice ``[r*L, (r+1)*L)`` of that order, with
   ``L = ceil(n / W)``; positions past the end wrap around to the start (as ``DistributedSampler`` pads),
   so every rank yields the same number of batches. When W divides n the ranks are disjoint and together
   cover every sample exactly once; with W == 1 every selected sample appears exactly once per epoch.
3. With ``shuffle``, samples are shuffled within consecutive groups of ``chunks_per_group`` chunks of the
   rank's slice (the shuffle buffer; generator seeded by ``(seed, epoch, rank)``), so reads stay
   chunk-aligned: in streaming mode each chunk is read once per epoch.
4. Batches are consecutive runs of ``batch_size`` samples of that order; the last one is short unless
   ``drop_last`` drops it.

Views: features are stored ``[N, V, C, H, W]``. With ``view='random'`` and V > 1 the view of each sample is
drawn from a generator seeded by ``(seed, epoch)`` over the whole split and indexed by the sample's index,
so it does not depend on the rank split nor on the mode; with V == 1 it is view 0; an int selects that view.

Streaming: background reader threads (``workers``) read and decompress the chunk groups ahead of use (at
most ``prefetch`` groups ahead); an assembler thread gathers each group's samples into batches in host
memory (pinned when ``pin_memory``); the consumer moves them with ``.to(device, non_blocking=True)`` and
casts on the device. An exception in a background thread is raised in the consumer unchanged, once every
thread of that iteration has ended (so no store read outlives the error: nothing is left running while the
program reports it and exits). Leaving an iteration early (``break``) or :meth:`FeatureLoader.close` stops its
threads and waits for the reads in flight (all of them are daemons).

In-memory mode (``in_memory=True``, or ``'auto'`` when the selected samples fit ``memory_budget`` bytes in
the stored dtype): the selected samples are read once, chunk by chunk, into one tensor (on the GPU when the
device is CUDA and it takes at most half of the free GPU memory, else in host memory, pinned when CUDA), and
every epoch batches are gathered from it by index in the order above.
"""
from __future__ import annotations

import math
import queue
import threading
from collections import deque

import numpy as np
import torch

from . import sampling
from .readers import JOIN_TIMEOUT, ReaderPool
from .errors import KtnasError
from .store import FeatureStore, open_store

_DONE = object()


def _is_int(value, low: int) -> bool:
    """An integer (numpy's too, not a bool) of at least ``low``."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low


class FeatureLoader:
    """Batches of one split of a feature store, streamed chunk by chunk or served from memory.

    ``store`` is a :class:`FeatureStore` or a path (opened with ``open_store``, which refuses incomplete
    stores and, with ``expect_fingerprint``, stores of another stem). See the module docstring for the
    order, view, prefetch and memory semantics.
    """

    def __init__(self, store, split: str = "train", *, batch_size: int = 64, shuffle: bool = True,
                 indices=None, rank: int = 0, world_size: int = 1, device="cpu", dtype=torch.float32,
                 view: str | int = "random", seed: int = 0, drop_last: bool = False,
                 chunks_per_group: int = 4, prefetch: int = 2, workers: int = 2,
                 in_memory: bool | str = "auto", memory_budget: int = 2 << 30,
                 pin_memory: bool | None = None, expect_fingerprint: str | None = None):
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("chunks_per_group", chunks_per_group, 1), ("prefetch", prefetch, 1),
                                 ("workers", workers, 1), ("seed", seed, 0), ("memory_budget", memory_budget, 0)):
            if not _is_int(value, low):
                raise KtnasError(f"{name} must be an integer >= {low}, got {value!r}: pass a valid {name}")
        if not _is_int(rank, 0) or rank >= world_size:
            raise KtnasError(f"rank {rank!r} is not in [0, world_size={world_size}): pass the process's rank "
                             "within its world size")
        if in_memory not in (True, False, "auto"):
            raise KtnasError(f"in_memory must be True, False or 'auto', got {in_memory!r}: pass one of those")

        self._owns_store = not isinstance(store, FeatureStore)
        if self._owns_store:
            store = open_store(store, expect_fingerprint=expect_fingerprint)
        elif expect_fingerprint is not None and store.attrs.get("stem_fingerprint") != expect_fingerprint:
            raise KtnasError(f"store {store.path} was built by another stem (fingerprint "
                             f"{str(store.attrs.get('stem_fingerprint', '?'))[:12]}) than the one asked for "
                             f"(fingerprint {expect_fingerprint[:12]}): use a store of that stem")
        self.store = store
        try:
            self.split = store.split(split)
            self._setup(indices, view)
        except BaseException:
            self.close()
            raise

        self.batch_size, self.shuffle, self.drop_last = int(batch_size), bool(shuffle), bool(drop_last)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.chunks_per_group, self.prefetch, self.workers = int(chunks_per_group), int(prefetch), int(workers)
        self.device, self.dtype, self.epoch = torch.device(device), dtype, 0
        cuda = self.device.type == "cuda"
        self.pin_memory = bool(cuda if pin_memory is None else pin_memory) and torch.cuda.is_available()
        self._stored_torch_dtype = torch.from_numpy(np.empty(0, dtype=self.split.dtype)).dtype
        self._mem_bytes = self._n * self._mem_views * int(np.prod(self.sample_shape)) * self.split.dtype.itemsize
        self._in_memory = bool(in_memory) if in_memory != "auto" else self._mem_bytes <= memory_budget
        self._mem = None  # (features [n * views, C, H, W], labels [n]) once loaded
        self._lock = threading.Lock()
        self._active: dict[threading.Event, threading.Thread] = {}
        self._num_classes = None

    def _setup(self, indices, view):
        """Validate the selection and the view; find the chunks that hold the selected samples."""
        sp = self.split
        self._sel = sampling.select(indices, sp.shape[0], sp.name, self.store.path)
        self._view = sampling.fixed_view(view, sp.views, sp.name)
        self._n, self._total = int(self._sel.size), sp.shape[0]
        self._mem_views = sp.views if self._view is None else 1
        self._chunks, self._chunk_slices = sampling.chunk_pieces(self._sel, sp.chunk_size)
        if not self.store.complete:
            missing = self._chunks[~sp.written()[self._chunks]]
            if missing.size:
                raise KtnasError(f"store {self.store.path} has not written chunk {missing[0]} of split '{sp.name}' "
                                 f"({missing.size} needed chunks missing): finish it with precompute --resume")

    # ----------------------------------------------------------------------------------------- properties
    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (before ``drop_last``): ceil(selected / world_size)."""
        return math.ceil(self._n / self.world_size)

    @property
    def in_memory(self) -> bool:
        return self._in_memory

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.split.shape[2:])

    @property
    def num_classes(self) -> int:
        """1 + the largest label among the selected samples."""
        if self._num_classes is None:
            self._num_classes = int(self.split.read_labels()[self._sel].max()) + 1
        return self._num_classes

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows (call it on every rank, every epoch)."""
        if not _is_int(epoch, 0):
            raise KtnasError(f"epoch must be an integer >= 0, got {epoch!r}: pass the epoch number")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # ------------------------------------------------------------------------------------------ the order
    def _order(self, epoch: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """This rank's sample order for ``epoch`` and its shuffle groups (position ranges into the order)."""
        return sampling.epoch_order(self._sel, self._chunk_slices, self.split.chunk_size, epoch=epoch,
                                    seed=self.seed, shuffle=self.shuffle, rank=self.rank,
                                    world_size=self.world_size, chunks_per_group=self.chunks_per_group)

    def _views(self, epoch: int, order: np.ndarray) -> np.ndarray | None:
        """The view of each sample of ``order`` when views are random (None when fixed)."""
        if self._view is not None:
            return None
        return sampling.epoch_views(order, epoch=epoch, seed=self.seed, views=self.split.views, total=self._total)

    # ------------------------------------------------------------------------------------------ iteration
    def __iter__(self):
        epoch = self.epoch
        if self._in_memory:
            return self._iter_memory(epoch)
        return self._iter_stream(epoch)

    def _to_device(self, feats: torch.Tensor, labels: torch.Tensor):
        feats = feats.to(self.device, non_blocking=True).to(self.dtype)
        return feats, labels.to(self.device, non_blocking=True)

    def _batch_buffers(self, size: int):
        """Host buffers (pinned when ``pin_memory``) for one batch: features in the stored dtype, labels."""
        feats = torch.empty((size, *self.sample_shape), dtype=self._stored_torch_dtype, pin_memory=self.pin_memory)
        return feats, torch.empty(size, dtype=torch.int64, pin_memory=self.pin_memory)

    def _iter_stream(self, epoch: int):
        order, groups = self._order(epoch)
        views = self._views(epoch, order)
        stop = threading.Event()
        batches: queue.Queue = queue.Queue(maxsize=max(2, self.prefetch))
        thread = threading.Thread(target=self._assemble, args=(order, views, groups, batches, stop),
                                  name="ktnas-assembler", daemon=True)
        with self._lock:
            self._active[stop] = thread
        thread.start()
        try:
            while True:
                try:
                    item = batches.get(timeout=0.2)
                except queue.Empty:
                    if stop.is_set():
                        return  # closed from elsewhere
                    if not thread.is_alive() and batches.empty():
                        raise RuntimeError("the feature assembler thread ended without finishing the epoch")
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._to_device(*item)
        finally:
            stop.set()
            with self._lock:
                self._active.pop(stop, None)
            thread.join(JOIN_TIMEOUT)  # it stops its readers before it ends

    def _assemble(self, order, views, groups, out: queue.Queue, stop: threading.Event):
        """Background: read chunk groups ahead through the reader pool, cut this rank's order into batches."""
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        pool, pending, next_group = ReaderPool(self.workers), deque(), 0
        cs, B, L = self.split.chunk_size, self.batch_size, len(order)
        try:
            def submit_ahead():
                nonlocal next_group
                while next_group < len(groups) and len(pending) < self.prefetch and not stop.is_set():
                    s, e = groups[next_group]
                    next_group += 1
                    chunks = np.unique(order[s:e] // cs).tolist()
                    pending.append((s, e, {c: pool.submit(self.split.read_chunk, c, True) for c in chunks}))

            start, buf, filled = 0, None, 0  # current batch: first position, buffers, samples in it
            submit_ahead()
            while pending and not stop.is_set():
                s, e, futures = pending.popleft()
                submit_ahead()
                chunks = {c: f.result() for c, f in futures.items()}
                feats, labels = self._gather(order[s:e], None if views is None else views[s:e], chunks)
                del chunks
                pos = 0
                while pos < e - s:
                    if buf is None:
                        size = min(B, L - start)
                        if self.drop_last and size < B:
                            put(_DONE)
                            return
                        buf, filled = self._batch_buffers(size), 0
                    take = min(len(buf[0]) - filled, e - s - pos)
                    buf[0][filled:filled + take] = torch.from_numpy(feats[pos:pos + take])
                    buf[1][filled:filled + take] = torch.from_numpy(labels[pos:pos + take])
                    filled, pos = filled + take, pos + take
                    if filled == len(buf[0]):
                        if not put(buf):
                            return
                        start, buf = start + filled, None
            if not stop.is_set():
                put(_DONE)
        except BaseException as e:
            put(e)
        finally:
            for _, _, futures in pending:
                for f in futures.values():
                    f.cancel()
            pool.shutdown()

    def _gather(self, samples, views, chunks):
        """Features [m, C, H, W] (stored dtype) and labels [m] of ``samples``, from their read chunks."""
        cs = self.split.chunk_size
        feats = np.empty((len(samples), *self.sample_shape), dtype=self.split.dtype)
        labels = np.empty(len(samples), dtype=np.int64)
        cid = samples // cs
        for c, (cf, cl) in chunks.items():
            mask = cid == c
            local = samples[mask] - c * cs
            feats[mask] = cf[local, self._view if views is None else views[mask]]
            labels[mask] = cl[local]
        return feats, labels

    # ------------------------------------------------------------------------------------- in-memory mode
    def _load_memory(self):
        """Read the selected samples once, chunk by chunk (with the reader pool ahead), into one tensor."""
        with self._lock:
            if self._mem is not None:
                return self._mem
            device = torch.device("cpu")
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                if self._mem_bytes <= free // 2:
                    device = self.device
            kw = dict(pin_memory=self.pin_memory) if device.type == "cpu" else {}
            feats = torch.empty((self._n, self._mem_views, *self.sample_shape), dtype=self._stored_torch_dtype,
                                device=device, **kw)
            labels = torch.empty(self._n, dtype=torch.int64, device=device, **kw)
            pool, futures = ReaderPool(self.workers), deque()
            try:
                chunks = self._chunks.tolist()
                for c in chunks[:self.prefetch]:
                    futures.append(pool.submit(self.split.read_chunk, c, True))
                row, cs = 0, self.split.chunk_size
                for i, (c, samples) in enumerate(zip(chunks, self._chunk_slices)):
                    cf, cl = futures.popleft().result()
                    if i + self.prefetch < len(chunks):
                        futures.append(pool.submit(self.split.read_chunk, chunks[i + self.prefetch], True))
                    local = samples - c * cs
                    cf = cf[local] if self._view is None else cf[local, self._view:self._view + 1]
                    feats[row:row + len(local)] = torch.from_numpy(np.ascontiguousarray(cf)).to(device)
                    labels[row:row + len(local)] = torch.from_numpy(cl[local]).to(device)
                    row += len(local)
            finally:
                for f in futures:
                    f.cancel()
                pool.shutdown()
            self._mem = (feats.view(self._n * self._mem_views, *self.sample_shape), labels)
            return self._mem

    def _iter_memory(self, epoch: int):
        feats, labels = self._load_memory()
        order, _ = self._order(epoch)
        views = self._views(epoch, order)
        rows = np.searchsorted(self._sel, order)
        flat = rows * self._mem_views + (0 if views is None else views)
        rows_t, flat_t = torch.from_numpy(rows).to(feats.device), torch.from_numpy(flat).to(feats.device)
        on_host = feats.device.type == "cpu"
        for k in range(len(self)):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            if on_host:
                fb, lb = self._batch_buffers(len(rows[sl]))
                torch.index_select(feats, 0, flat_t[sl], out=fb)
                torch.index_select(labels, 0, rows_t[sl], out=lb)
            else:
                fb, lb = feats.index_select(0, flat_t[sl]), labels.index_select(0, rows_t[sl])
            yield self._to_device(fb, lb)

    # ------------------------------------------------------------------------------------------- teardown
    def close(self) -> None:
        """Stop running iterations' threads and wait for them (reads in flight finish), drop the in-memory copy,
        close the store if this loader opened it."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with lock:
                active = list(self._active.items())
                self._active.clear()
                for stop, _ in active:
                    stop.set()
                self._mem = None
            for _, thread in active:
                if thread is not threading.current_thread():
                    thread.join(JOIN_TIMEOUT)
        if self._owns_store and self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
