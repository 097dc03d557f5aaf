"""ktnas bench kernels: every implementation runs and is checked against the reference in the same run; the
report holds the documented columns. The Triton kernels run in Triton's interpreter here (conftest sets
TRITON_INTERPRET=1 without a GPU), so no timing is asserted, only that each was measured."""
import json
import math

import pytest
import torch

from ktnas.bench.kernels import fused_bytes, parse_shapes
from ktnas.cache.errors import KtnasError
from ktnas.engine.cli import main
from ktnas.kernels import triton_mixed

ERR = {"fp32": 1e-4, "bf16": 3e-2}


def _run(tmp_path, *flags):
    out = tmp_path / "bk"
    assert main(["bench", "kernels", "--device", "cpu", "--quick", "--sets", "2", "--out", str(out), *flags]) == 0
    data = json.loads((out / "results.json").read_text())
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data, (out / "results.md").read_text()


@pytest.mark.skipif(not triton_mixed.available("cpu"), reason="needs the Triton interpreter")
def test_bench_kernels_triton_vs_eager(tmp_path, capsys, one_thread):
    # the interpreter runs one program per channel (and tile): few channels, one of the shapes odd and not square
    data, md = _run(tmp_path, "--shapes", "2,2,5,5;1,3,4,6", "--dtypes", "fp32,bf16", "--impls", "eager,triton",
                    "--stride", "2")
    rows = data["rows"]
    assert [(r["edge"], r["shape"], r["dtype"]) for r in rows] == [
        (e, s, d) for e in ("darts", "free") for s in ("2x2x5x5", "1x3x4x6") for d in ("fp32", "bf16")]
    for r in rows:
        assert r["stride"] == 2 and r["device"] == "cpu"
        for key in ("eager_ms", "triton_ms", "speedup_vs_eager", "gb_per_s"):
            assert r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert r["compile_ms"] is None and r["speedup_vs_compile"] is None  # not asked for
        assert r["eager_err"] == 0 and r["triton_err"] < ERR[r["dtype"]], r
        assert (r["bw_frac"] is not None) == (r["edge"] == "free")
        assert r["eager_peak_bytes"] is None  # CPU: no allocator statistics
    assert "Triton's interpreter" in md and "copy bandwidth in the same run" in md
    assert md.count("\n| darts |") == 4 and md.count("\n| free |") == 4
    assert "|---|" in capsys.readouterr().out


def test_bench_kernels_errors(tmp_path, capsys):
    for bad in (["--shapes", "2,4,5"], ["--dtypes", "fp64"], ["--impls", "cuda"], ["--edges", ""]):
        assert main(["bench", "kernels", "--device", "cpu", "--quick", "--out", str(tmp_path), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ktnas: error: ") and "\n" not in err and bad[0] in err, err
    with pytest.raises(KtnasError, match="N,C,H,W"):
        parse_shapes("1,2,x,4")
    assert parse_shapes("64,16,32,32;1,2,3,4") == [(64, 16, 32, 32), (1, 2, 3, 4)]


def test_fused_bytes_counts_every_pass():
    """Parameter-free edge at stride 1: forward reads x twice (statistics, output) and writes out; backward reads
    g and x (reduce), g, x and writes dx (gradients): 5 x-sized and 3 out-sized transfers."""
    X = 2 * 3 * 8 * 8 * 4
    assert fused_bytes((2, 3, 8, 8), torch.float32, ("none", "skip_connect", "avg_pool_3x3", "max_pool_3x3")) == 8 * X
    # conv branches add their output to the statistics, output and reduce passes, and to the gradient pass their
    # read, their gradient's write and one more read of g (at output positions)
    darts = fused_bytes((2, 3, 8, 8), torch.float32, ("avg_pool_3x3", "sep_conv_3x3"))
    assert darts == 8 * X + 6 * X and fused_bytes((2, 3, 8, 8), torch.bfloat16, ("avg_pool_3x3",)) == 4 * X
