"""Precompute's bookkeeping for resumed and sharded runs: what defines a store's content (the request and its
hash), joining or resuming a store made by the same request, and which chunks this shard still has to write."""
from __future__ import annotations

import hashlib
import json

from .errors import KtnasError
from .store import create_store, open_store, remove_store, store_exists, store_lock


def request(cfg, stem, splits: dict, chunk_size: int) -> dict:
    """What defines the store's content: equal requests write equal stores (resume and shards check it)."""
    return dict(stem_fingerprint=stem.fingerprint, dataset=cfg.dataset,
                dataset_fingerprints={k: s.fingerprint for k, s in splits.items()}, limit=cfg.limit,
                views=cfg.views, dtype=cfg.dtype, chunk_size=chunk_size, compressor=cfg.compressor, seed=cfg.seed)


def request_hash(req: dict) -> str:
    return hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()


def open_or_create(cfg, attrs, shapes, chunk_size):
    """Create the store, or join/resume an existing one with the same request; refuse anything else."""
    out, (_, n_shards) = cfg.out, cfg.shard
    with store_lock(out):
        if store_exists(out):
            try:
                old = open_store(out, "a", require_complete=False)
            except KtnasError:
                if not cfg.overwrite:
                    raise
                old = None
            same = old is not None and old.attrs.get("request_hash") == attrs["request_hash"]
            sibling = same and not old.complete and n_shards > 1  # a store another shard of this run made
            if cfg.resume or sibling:
                if not same:
                    diff = _first_difference(old.attrs.get("request", {}), attrs["request"]) if old else "format"
                    raise KtnasError(f"cannot resume {out}: it was made with another {diff}; rerun with the "
                                     "original arguments, or pass --overwrite to replace it")
                return old
            if not cfg.overwrite:
                if old is not None:
                    old.close()
                raise KtnasError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
            if old is not None:
                old.close()
            remove_store(out)
        return create_store(out, attrs=attrs, splits=shapes, dtype=cfg.dtype, chunk_size=chunk_size,
                            compressor=cfg.compressor)


def _first_difference(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k} ({a.get(k)!r} there, {b.get(k)!r} now)"
    return "configuration"


def pending_chunks(split_handles: dict, shard: tuple[int, int]) -> list[tuple[str, int]]:
    """(split, chunk) pairs that shard ``I/N`` owns (chunk index ≡ I mod N) and that are not written yet."""
    shard_i, n_shards = shard
    todo = []
    for s, sp in split_handles.items():
        written = sp.written()
        todo += [(s, i) for i in range(sp.num_chunks) if i % n_shards == shard_i and not written[i]]
    return todo
