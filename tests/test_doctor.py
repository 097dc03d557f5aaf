"""``ktnas doctor``: on the CPU it checks what applies (the interpreted kernels against the reference at small
shapes, the compiled step against the eager one), shows a table, writes JSON, and exits non-zero on a failure."""
import json

import pytest

from conftest import ktnas


def test_doctor_on_the_cpu(tmp_path):
    """As a user runs it (a fresh process, triton imported without the interpreter: the kernels are checked in a
    child process that has it)."""
    r = ktnas("doctor", "--device", "cpu", "--out", tmp_path, env={"TRITON_INTERPRET": "0"})
    lines = r.stdout.splitlines()
    assert lines[0] == "ktnas doctor: cpu, fp32" and lines[1].split() == ["check", "status", "seconds", "detail"]
    rows = {ln.split()[0]: ln.split()[1] for ln in lines[2:6]}
    assert rows == dict(versions="ok", kernels="ok", capture="ok", memory="skipped"), r.stdout
    d = json.loads((tmp_path / "doctor.json").read_text())
    assert d["ok"] and d["device"] == "cpu"
    cases = next(c for c in d["checks"] if c["check"] == "kernels")["data"]["cases"]
    kinds = {(c["space"], c["variant"], c["stride"]) for c in cases}
    assert {("darts", "full", 1), ("darts", "full", 2), ("darts", "pc", 2), ("darts", "gdas", 2),
            ("nb201", "full", 1), ("nb201", "gdas", 1)} <= kinds
    assert all(c["failure"] is None and c["errors"]["out"][0] <= c["tol"] * c["errors"]["out"][1] for c in cases)
    assert "torch.compile (aot_eager)" in next(c for c in d["checks"] if c["check"] == "capture")["detail"]


def test_doctor_fails_on_kernels_that_disagree(tmp_path, monkeypatch, capsys):
    """Fused kernels 1% off: the kernel check fails naming a specialisation, the JSON says so, the exit status
    is 1; the other checks still run."""
    from ktnas.engine import cli
    from ktnas.engine.profile import doctor
    from ktnas.kernels import mixed

    for v in mixed.VARIANTS:  # the reference stands in for the fused kernels (no interpreter): the full op 1% off
        ref = mixed.DISPATCH[("torch", v)]
        monkeypatch.setitem(mixed.DISPATCH, ("triton", v), (lambda r: lambda *a, **kw: r(*a, **kw) * 1.01)(ref)
                            if v == "full" else ref)
    monkeypatch.setattr(doctor, "capture", lambda device, precision: ("ok", "stood in", {}))
    assert cli.main(["doctor", "--device", "cpu", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "kernels    FAIL" in out and "failing: darts full stride 1" in out
    assert "out differs from the reference" in out
    d = json.loads((tmp_path / "doctor.json").read_text())
    assert not d["ok"] and [c["status"] for c in d["checks"]] == ["ok", "FAIL", "ok", "skipped"]


def test_doctor_refuses_an_unknown_precision():
    from ktnas.cache.errors import KtnasError
    from ktnas.engine.profile.doctor import doctor

    with pytest.raises(KtnasError, match="unknown --precision 'fp8': use fp32 or bf16"):
        doctor("cpu", "fp8")
