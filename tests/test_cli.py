"""The `ktnas` command itself: stems listing, precompute + inspect round trip, verify/repair exit codes."""
import json

from conftest import ktnas, tiny_args
from ktnas.cache.stems import list_stems


def test_stems_lists_every_stem_with_channels_and_stride():
    r = ktnas("stems", "--image-size", "64")
    for row in list_stems():
        h = 64 // row["stride"]
        assert f"{row['spec']}" in r.stdout and f"{row['channels']}x{h}x{h}" in r.stdout
    rows = json.loads(ktnas("stems", "--json").stdout)
    assert {"spec": "mobilenet_v2:features.3", "channels": 24, "stride": 4} in rows


def test_precompute_then_inspect_verify_and_repair(tmp_path):
    out = tmp_path / "s.zarr"
    r = ktnas(*tiny_args(out, limit=80))
    assert "store complete" in r.stdout and "wrote 4 chunks (160 images)" in r.stdout
    r = ktnas("inspect", out, "--verify", "--quiet")
    assert "complete   True" in r.stdout and r.stdout.count("verify: ok") == 2
    assert "features [80, 1, 16, 16, 16] float16" in r.stdout
    rep = json.loads(ktnas("inspect", out, "--json").stdout)
    assert rep["attrs"]["stem"] == "mobilenet_v2:features.1" and rep["splits"]["test"]["chunks_written"] == 2
    chunk = out / "test" / "features" / "c" / "1" / "0" / "0" / "0" / "0"
    chunk.write_bytes(b"garbage")
    r = ktnas("inspect", out, "--verify", "--quiet", check=False)
    assert r.returncode == 1 and "1 bad chunks" in r.stdout and "--repair" in r.stderr
    r = ktnas("inspect", out, "--repair", "--quiet", check=False)
    assert r.returncode == 1 and "flagged unwritten" in r.stderr
    r = ktnas(*tiny_args(out, limit=80, resume=True))
    assert "wrote 1 chunks" in r.stdout and "store complete" in r.stdout
    assert ktnas("inspect", out, "--verify", "--quiet").returncode == 0


def test_inspect_of_a_missing_store_is_one_line(tmp_path):
    r = ktnas("inspect", tmp_path / "none.zarr", check=False)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"ktnas: error: no feature store at {tmp_path / 'none.zarr'}: create it with "
        f"`ktnas precompute-features --out {tmp_path / 'none.zarr'}`")
