"""ktnas bench step: the instruments against ground truth (the CPU allocator's own record, real vs fake tensors),
the H100 anchors at batch 64, a faithful classic baseline (launches and saved bytes within 10% of DARTS' own code),
CUDA's autocast policy, and the report. Counts and bytes are deterministic; no timing is asserted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ktnas.engine.profile.instruments import (CudaAutocast, StepTracker, cpu_allocator_peak, cuda_bytes,
                                              saved_for_backward)
from ktnas.bench.step import ANCHORS, DARTS_OWN, LAUNCH_US, predict, profile_step
from ktnas.cache.errors import KtnasError
from ktnas.engine.cli import main
from ktnas.engine.search.supernet import Supernet

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(layers=2, channels=4)  # two cells (one a reduction): fast on real and fake tensors alike
pytestmark = pytest.mark.usefixtures("one_thread")


def test_cuda_rounding():
    assert [cuda_bytes(n) for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]
    assert cuda_bytes(513, round_to=1) == 513


def test_tracker_peak_equals_the_cpu_allocators_record():
    """On a real CPU step, the tracker's peak (exact bytes) is the allocator's own, within a few hundred bytes (a
    scalar or two the allocator and the tracker book at different moments) of 6 MB."""
    torch.manual_seed(0)
    m = Supernet("darts", 10, 3, stem="conv", layers=2, channels=4, reductions=(1,), kernels="torch")
    opt = torch.optim.SGD(m.weight_parameters(), 0.1, momentum=0.9)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))

    def step():
        F.cross_entropy(m(x), y).backward()
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)
    truth = cpu_allocator_peak(step)
    opt.zero_grad(set_to_none=True)
    tr = StepTracker(round_to=1)
    with tr:
        tr.track(*m.parameters(), x, y, *[v for s in opt.state.values() for v in s.values()])
        base = tr.current
        tr.reset_peak()
        step()
    assert abs((tr.peak - base) - truth) <= 1024, (tr.peak - base, truth)
    assert truth > 1e6


def test_tracker_frees_and_counts():
    tr = StepTracker()
    with tr:
        a = torch.ones(1000)          # fill: one launch
        with tr.count():
            b = a * 2                 # one launch
            c = b.view(10, 100)       # a view: none
            d = torch.empty(5)        # no kernel
            float(b.sum())            # sum: one launch; .item(): a sync
        live = tr.current
        del b, c, d
    assert tr.launches == 2 and tr.syncs == 1, tr.ops
    assert live == 2 * cuda_bytes(4000) + cuda_bytes(20)  # a, b and d (the sum's scalar is gone)
    assert tr.peak == live + 512  # while the sum's scalar lived
    assert tr.current == cuda_bytes(4000)  # only a left
    assert tr.bytes_moved == 4000 + 4000 + 4000 + 4


def test_foreach_counts_as_multi_tensor_launches():
    ps = [torch.zeros(3) for _ in range(130)]
    tr = StepTracker()
    with tr, tr.count():
        torch._foreach_add_(ps, 1.0)  # one list: 110 tensors a launch (CUDA's multi_tensor_apply)
    assert tr.launches == 2


def test_saved_for_backward_excludes_parameters():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    with saved_for_backward(exclude=[w]) as s:
        y = (x @ w).relu()  # saves x (mm), and relu's output
    assert s["bytes"] == x.numel() * 4 + y.numel() * 4


def test_cuda_autocast_policy():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with CudaAutocast():
        y = conv(x)
        z = torch.softmax(y, 1)
        r = y.relu()
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32 and r.dtype == torch.bfloat16
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("config,algo", [("baseline", "darts-1"), ("cached", "darts-2"), ("cached", "gdas"),
                                         ("stem-on-the-fly", "pcdarts")])
def test_fake_step_equals_real_step(config, algo):
    """A step on fake tensors gives the figures of the same step computed on real ones."""
    kw = dict(precision="fp32", **TINY)
    real = profile_step(config, "darts", algo, 4, fake=False, **kw)
    fake = profile_step(config, "darts", algo, 4, fake=True, **kw)
    exact = ("weights_bytes", "grads_bytes", "optimizer_bytes", "params")
    if algo == "gdas":  # fake tensors have no alpha values: the sample comes from the Gumbel noise alone, and where
        # the real alphas (~1e-3) tip a near-tie another op is sampled; the figures agree to that
        for k in ("saved_bytes", "aten_launches", "flops", "bytes_moved", "peak_bytes"):
            assert fake[k] == pytest.approx(real[k], rel=0.05), (k, real[k], fake[k])
    else:
        exact += ("saved_bytes", "aten_launches", "flops", "bytes_moved")
        # the peak to a few allocator blocks: a scalar of the second-order step lives a moment longer for real
        assert abs(real["peak_bytes"] - fake["peak_bytes"]) <= 4 * 512, (real["peak_bytes"], fake["peak_bytes"])
    for k in exact:
        assert real[k] == fake[k], (k, real[k], fake[k])
    assert real["peak_bytes"] > real["weights_bytes"] + real["grads_bytes"] + real["optimizer_bytes"]
    assert real["optimizer_bytes"] > 0  # the warm-up step made the momentum and Adam buffers


def test_nb201_and_bf16_rows():
    r32 = profile_step("cached", "nb201", "darts-1", 4, **TINY)
    r16 = profile_step("cached", "nb201", "darts-1", 4, precision="bf16", **TINY)
    assert r16["flops"] == r32["flops"] and r16["saved_bytes"] < r32["saved_bytes"]
    assert r16["compute_ms"] < r32["compute_ms"]  # bf16 tensor cores


def test_predict():
    row = dict(precision="fp32", flops=494.7e9, bytes_moved=3.35e9, launches=1000)
    p = predict(row, "H100")
    assert p["compute_ms"] == pytest.approx(1.0) and p["memory_ms"] == pytest.approx(1.0)
    assert p["launch_ms"] == pytest.approx(1000 * LAUNCH_US / 1e3)
    assert p["predicted_ms"] == max(p["floor_ms"], p["launch_ms"])
    assert LAUNCH_US == pytest.approx(784.0 / 28_767 * 1e3)


def test_refusals():
    with pytest.raises(KtnasError, match="unknown configuration"):
        profile_step("nope")
    with pytest.raises(KtnasError, match="precision"):
        profile_step("cached", precision="fp8")


@pytest.fixture(scope="module")
def batch64():
    """The default configurations at the papers' batch 64, first order, fp32 (fake tensors)."""
    return {c: profile_step(c, "darts", "darts-1", 64) for c in ("baseline", "cached", "cached-darts-edges")}


def test_anchors_h100_first_order(batch64):
    """Peak memory at batch 64 within 10% of max_memory_allocated measured on the H100: classic DARTS' own code
    7,766 MiB, DARTS' own code on the KT-NAS layout (its first cells replaced by the cached 24x16x16 input)
    3,270 MiB; ktnas's own KT-NAS edges (one ReLU per edge, 'none' free) keep less still."""
    for config in ("baseline", "cached-darts-edges"):
        mib = batch64[config]["peak_bytes"] / 2**20
        anchor = ANCHORS[(config, "darts", "darts-1", "fp32")]
        assert abs(mib / anchor - 1) <= 0.10, (config, mib, anchor)
    assert batch64["cached"]["peak_bytes"] < batch64["cached-darts-edges"]["peak_bytes"]


def test_memory_target_default_step(batch64):
    """The memory target at batch 64, first order, fp32: the default KT-NAS step (each mixed edge
    recomputed in backward) peaks at most 1/8 of classic DARTS' step, reference and fused ops alike; recomputing
    costs launches and FLOPs, bounded here (a step captured in one CUDA graph pays one launch)."""
    base, cached = batch64["baseline"], batch64["cached"]
    fused = profile_step("cached-fused", "darts", "darts-1", 64)
    assert cached["recompute"] == fused["recompute"] == "edge" and base["recompute"] == "none"
    for r in (cached, fused):
        assert r["peak_bytes"] <= base["peak_bytes"] / 8, (r["config"], r["peak_bytes"], base["peak_bytes"])
        assert r["flops"] <= 0.75 * base["flops"]
    assert fused["launches"] <= 0.5 * base["launches"]


def test_memory_target_second_order():
    """Second order at batch 64: the default KT-NAS step within 1/8 of classic DARTS' and under 2 GiB."""
    base = profile_step("baseline", "darts", "darts-2", 64)
    kt = profile_step("cached", "darts", "darts-2", 64)
    assert kt["peak_bytes"] <= base["peak_bytes"] / 8 and kt["peak_bytes"] < 2 * 2**30, (kt["peak_bytes"],
                                                                                         base["peak_bytes"])


def test_classic_baseline_is_darts_own_code(batch64):
    """The classic step (--stem none, reference ops) within 10% of DARTS' own code in launches and in bytes saved
    for backward, with its 1,930,618 weights and 15.18 GFLOP per sample (both counted by this profile)."""
    b = batch64["baseline"]
    assert b["params"] == 1_930_618
    assert b["flops"] / 64 == pytest.approx(15.18e9, rel=0.005)
    assert abs(b["launches"] / DARTS_OWN["launches"] - 1) <= 0.10, b["launches"]
    assert abs(b["saved_bytes"] / DARTS_OWN["saved_bytes"] - 1) <= 0.10, b["saved_bytes"]
    assert b["launches"] <= 1.10 * DARTS_OWN["launches"]  # the bound: a step no heavier than DARTS' own
    c = batch64["cached"]
    assert c["launches"] < b["launches"] and c["peak_bytes"] < 0.5 * b["peak_bytes"]


def test_cli_quick(tmp_path):
    out = tmp_path / "step"
    assert main(["bench", "step", "--quick", "--configs", "baseline,cached", "--batch-size", "2",
                 "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert [r["config"] for r in rows] == ["baseline", "cached"]
    assert rows[0]["mem_ratio"] == 1.0 and 0 < rows[1]["mem_ratio"] < 1
    assert rows[1]["launch_ratio"] < 1
    md = (out / "results.md").read_text()
    assert "launches (exact)" in md and "floor ms (est.)" in md and "bench step --quick" in md
    assert (out / "results.png").stat().st_size > 1000


def test_gpu_check_dry_run(tmp_path):
    """The GPU check script's CPU branch: every GPU command parses, the interpreted kernel tests and a tiny
    profile run, the comparison is written (predictions only); what it leaves for return is two files, summary.md
    and a tarball of the logs (at most 8 files, at most 2 folders deep), and no feature store."""
    import tarfile

    ret = tmp_path / "return"
    env = dict(__import__("os").environ, WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu-check.sh"), "--dry-run", "--return", str(ret)],
                       capture_output=True, text=True, env=env, timeout=900)
    summary = (ret / "summary.md").read_text()
    assert r.returncode == 0, summary + r.stderr[-2000:]
    for name in ("env", "doctor", "profile", "triton-tests", "kernels", "search", "captured", "compare"):
        assert f"| {name} |" in summary, summary
    assert "dry run: command parses" in summary and "predictions only" in summary
    back = [p for p in ret.rglob("*") if p.is_file()]
    assert sorted(p.name for p in back) == ["gpu-check.tar.gz", "summary.md"]
    assert all(len(p.relative_to(ret).parts) <= 3 for p in back)
    with tarfile.open(ret / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
        assert {"logs/summary.md", "logs/compare.md", "logs/doctor.log", "logs/bench-step/results.json"} <= set(names)
        assert not any(".zarr" in n for n in names)
        rows = json.loads(tar.extractfile("logs/bench-step/results.json").read())["rows"]
    assert rows


def test_fused_row_on_fake_tensors():
    """The fused op runs on fake tensors (its registered fake implementation): its Triton launches are counted by
    the op, its elementwise FLOPs kept apart, and it keeps less and launches fewer ATen kernels than the reference."""
    # nothing recomputed: the fused op's own saving (recomputed edges keep only their inputs in both)
    ref = profile_step("cached", "darts", "darts-1", 4, recompute="none", **TINY)
    fused = profile_step("cached-fused", "darts", "darts-1", 4, recompute="none", **TINY)
    edges = 2 * 14  # two cells of 14 edges; one first-order step: two forwards and two backwards per edge
    assert fused["triton_launches"] >= 2 * edges * (3 + 3)
    assert fused["flops"] == ref["flops"] and fused["fused_op_flops"] > 0
    assert fused["aten_launches"] < ref["aten_launches"] and fused["peak_bytes"] < ref["peak_bytes"]
    assert fused["saved_bytes"] < ref["saved_bytes"]
