"""The fused kernels compile ahead of time for sm_90 without spilling registers (no GPU needed): a kernel that
Triton's interpreter accepts but the compiler rejects, or that spills at the launch configuration the wrapper
uses, fails here. Compiles in subprocesses without TRITON_INTERPRET (kernels/aot.py); registers and spills come
from the ptxas shipped with triton. Counts only, never times."""
import json
import os

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

from ktnas.engine.cli import main  # noqa: E402
from ktnas.kernels import aot  # noqa: E402
from ktnas.kernels import triton_mixed as tm  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
needs_ptxas = pytest.mark.skipif(not os.access(PTXAS, os.X_OK), reason="triton ships no ptxas here")


def test_specs_are_the_wrappers_launches():
    """The enumeration records what the wrapper launches: every kernel, the tile widths and warps of
    LAUNCH_CONFIG, the flags of both spaces and strides."""
    specs = aot.kernel_specs(("bf16",), shapes=((32, 16),))
    assert {s["kernel"] for s in specs} == set(tm.LAUNCH_CONFIG)
    for s in specs:
        block, warps = tm.LAUNCH_CONFIG[s["kernel"]]
        c = s["constexprs"]
        assert s["num_warps"] == warps and c.get("BLOCK", c.get("BT")) <= block, s
        # the edge's tensors in bf16; the statistics, partials and weight slots in fp32
        assert {a for a in s["args"] if str(a).startswith("tensor:")} <= {"tensor:bfloat16", "tensor:float32"}
    grads = [s["constexprs"] for s in specs if s["kernel"] == "_bwd_grad_kernel"]
    assert {(c["STRIDE"], c["POOL_BN"], c["HAS_MAX"]) for c in grads} >= {(1, True, True), (2, True, True),
                                                                        (1, False, False), (2, False, False)}
    assert max(c["K"] for c in grads) == 5 and min(c["K"] for c in grads) == 0
    most = aot.most_demanding(specs)
    assert len(most) == len(tm.LAUNCH_CONFIG)


@needs_ptxas
@pytest.mark.timeout(600)
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    """``ktnas bench kernels --aot --quick``: the most demanding specialisation of every kernel in bf16 for
    sm_90, plus the gradient pass (the worst spiller) in fp32: all compile, none spills."""
    out = tmp_path / "aot"
    assert main(["bench", "kernels", "--aot", "--quick", "--dtypes", "bf16", "--archs", "90", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == set(tm.LAUNCH_CONFIG) and len(rows) == len(tm.LAUNCH_CONFIG)
    grad = next(r for r in rows if r["kernel"] == "_bwd_grad_kernel")
    fp32 = dict({k: grad[k] for k in ("kernel", "constexprs", "num_warps", "grid", "used_by", "edges")},
                dtype="fp32", args=[a.replace("bfloat16", "float32") if isinstance(a, str) else a
                                    for a in grad["args"]])
    rows += aot.compile_report([fp32], archs=(90,))
    for r in rows:
        assert r["compiled"], (r["kernel"], r["dtype"], r["error"])
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, r
        assert 0 < r["registers"] < 255 and r["arch"] == 90, r
    assert "all compiled, none spills" in (out / "results.md").read_text()


def test_aot_bad_archs(tmp_path, capsys):
    assert main(["bench", "kernels", "--aot", "--archs", "sm90", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ktnas: error: ") and "--archs" in err and "\n" not in err


def test_the_kernels_edges_are_the_spaces_edges():
    """kernels/ imports nothing from the engine, so it names the built-in spaces' edges itself (their ops in alpha
    order and whether BN follows the pools): they must be the spaces' own."""
    from ktnas.engine.spaces import SPACES

    for name, (ops, pool_bn) in aot.SPACES.items():
        assert (ops, pool_bn) == (SPACES[name].ops, SPACES[name].pool_bn), name
    assert set(aot.SPACES) == {"darts", "nb201"} <= set(SPACES)
