"""Data-parallel search under torchrun (2 CPU processes, gloo) and the gradient all-reduce helper."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ktnas.engine.distributed import all_reduce_grads, all_reduce_mean
from ktnas.engine.spaces import genotype_str
from ktnas.engine.spaces import load_genotype

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(not dist.is_available() or TORCHRUN is None, reason="needs torch.distributed")


@pytest.fixture(scope="module")
def store(search_store):
    """conftest's tiny store (64 synthetic images through an untrained mobilenet_v2:features.1)."""
    return search_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grad_worker(rank: int, world: int, port: int, out: str, store: str) -> None:
    from ktnas.cache.errors import KtnasError
    from ktnas.engine.search import loop as S

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        a, b, c, d = (torch.nn.Parameter(torch.zeros(s)) for s in ((2, 3), (4,), (2,), (1,)))
        a.grad = torch.full((2, 3), float(rank + 1))  # 1 and 2 on ranks 0 and 1: mean 1.5
        b.grad = torch.arange(4.0) * (rank + 1)        # mean 1.5 * arange
        if rank == 1:
            c.grad = torch.tensor([2.0, 4.0])          # missing on rank 0: counts as zero there
        all_reduce_grads([a, b, c, d])                 # d: no gradient anywhere
        t = [torch.tensor([float(rank)]), torch.ones(2, 2) * rank]
        all_reduce_mean(t)
        # a search whose weight gradients are not averaged: the end-of-epoch check must catch the divergence
        from ktnas.engine import distributed as D

        D.all_reduce_grads = lambda params: None
        try:
            S.search(features=store, out=os.path.join(out, "run"), epochs=1, batch_size=8, layers=2, channels=4,
                     reductions=(1,), limit=32, device="cpu", progress=False)
            error = None
        except KtnasError as e:
            error = str(e)
        torch.save(dict(a=a.grad, b=b.grad, c=c.grad, d=d.grad, t0=t[0], t1=t[1], error=error),
                   os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_grads_averages_over_ranks(store, tmp_path):
    """all_reduce_grads / all_reduce_mean average over 2 gloo ranks; an unsynchronised search is caught."""
    mp.spawn(_grad_worker, args=(2, _free_port(), str(tmp_path), store), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(r["a"], torch.full((2, 3), 1.5))
        torch.testing.assert_close(r["b"], torch.arange(4.0) * 1.5)
        torch.testing.assert_close(r["c"], torch.tensor([1.0, 2.0]))
        assert r["d"] is None
        torch.testing.assert_close(r["t0"], torch.tensor([0.5]))
        torch.testing.assert_close(r["t1"], torch.full((2, 2), 0.5))
        assert r["error"] and "ranks disagree after epoch 1" in r["error"] and "\n" not in r["error"]


def torchrun_search(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "ktnas.engine.cli", "search", "--device", "cpu",
           "--layers", "2", "--channels", "4", "--reductions", "1", "--batch-size", "8", "--epochs", "1",
           "--limit", "64", "--quiet", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r


@pytest.mark.parametrize("algo,extra", [("darts", ()), ("gdas", ()), ("darts", ("--order", "2"))])
def test_torchrun_search_ranks_agree(store, tmp_path, algo, extra):
    out = tmp_path / "run"
    torchrun_search("--features", store, "--out", out, "--algo", algo, *extra)
    assert {"config.json", "genotype.json", "alphas.npz", "metrics.jsonl", "checkpoint.pt", "alphas.png",
            "normal.png", "reduce.png"} <= {p.name for p in out.iterdir()}
    conf = json.loads((out / "config.json").read_text())
    assert (conf["world_size"], conf["batch_size"], conf["effective_batch_size"]) == (2, 8, 16)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["world_size"] == 2 and len(rec["rank_alpha_hashes"]) == 2
    assert rec["rank_alpha_hashes"][0] == rec["rank_alpha_hashes"][1]  # both ranks hold the same alphas
    assert rec["genotype"] == genotype_str(load_genotype(out / "genotype.json"))
    if algo == "darts" and not extra:  # resume after the last epoch: every rank takes rank 0's checkpoint
        before = (out / "metrics.jsonl").read_text()
        torchrun_search("--features", store, "--out", out, "--algo", algo, "--resume")
        assert (out / "metrics.jsonl").read_text() == before


def test_torchrun_search_compiled_equals_plain(store, tmp_path):
    """Under torchrun with --capture compile (GDAS: its fixed-shape sample) the search ends as the plain one."""
    runs = {}
    for capture in ("none", "compile"):
        out = tmp_path / capture
        torchrun_search("--features", store, "--out", out, "--algo", "gdas", "--capture", capture,
                        "--compile-backend", "aot_eager", "--layers", "1", "--reductions", "0",  # one reduction
                        timeout=600)                                                             # cell: both strides
        conf = json.loads((out / "config.json").read_text())
        assert conf["capture_used"] == capture and conf["world_size"] == 2
        runs[capture] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert runs["compile"]["genotype"] == runs["none"]["genotype"]
    for key in ("train_loss", "val_loss"):
        assert runs["compile"][key] == pytest.approx(runs["none"][key], rel=1e-5), key
