"""ktnas.cache.flags: flags generated from config dataclasses, the positive-integer check, byte sizes."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import pytest

from ktnas.cache.errors import KtnasError
from ktnas.cache.flags import (add_config_arguments, check_positive, comma_tuple, config_from_args, flag_name,
                               format_bytes, parse_size)


@dataclass
class Cfg:
    out: str = field(metadata={"help": "run directory"})
    epochs: int | None = field(default=None, metadata={"help": "default: 50 (gdas: 250)"})
    lr: float = 0.025
    momentum: Optional[float] = None
    space: str = field(default="darts", metadata={"choices": ("darts", "nb201"), "help": "search space"})
    precision: Literal["fp32", "bf16"] = "fp32"
    resume: bool = field(default=False, metadata={"help": "continue the run", "exclusive": "mode"})
    overwrite: bool = field(default=False, metadata={"exclusive": "mode"})
    progress: bool = field(default=True, metadata={"flag": "quiet", "help": "no progress bars"})
    cache: bool = True
    reductions: tuple[int, ...] | None = field(default=None, metadata={"metavar": "I,J"})
    splits: tuple[str, ...] = ("train", "test")
    betas: tuple[float, float] = (0.5, 0.999)
    max_memory: int | str | None = field(default=None, metadata={"type": str, "metavar": "SIZE"})
    batch_size: int = 64
    derived: int = field(default=0, init=False)


def parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_config_arguments(p, Cfg, **kw)
    return p


def parse(*argv, **kw) -> Cfg:
    return config_from_args(Cfg, parser(**kw).parse_args(["--out", "o", *argv]))


def test_defaults_round_trip():
    assert parse() == Cfg(out="o")


def test_every_kind_round_trips():
    c = parse("--epochs", "3", "--lr", "0.1", "--momentum", "0.8", "--space", "nb201", "--precision", "bf16",
              "--resume", "--quiet", "--no-cache", "--reductions", "2,5", "--splits", "train", "--betas", "0.9,0.99",
              "--max-memory", "2GiB", "--batch-size", "8")
    assert c == Cfg(out="o", epochs=3, lr=0.1, momentum=0.8, space="nb201", precision="bf16", resume=True,
                    progress=False, cache=False, reductions=(2, 5), splits=("train",), betas=(0.9, 0.99),
                    max_memory="2GiB", batch_size=8)
    assert parse("--reductions", "").reductions == ()
    assert isinstance(parse("--lr", "1").lr, float)


def test_flags_named_from_fields_and_metadata():
    actions = add_config_arguments(argparse.ArgumentParser(), Cfg)
    assert "derived" not in actions
    assert actions["batch_size"].option_strings == ["--batch-size"]
    assert actions["progress"].option_strings == ["--quiet"] and actions["progress"].default is True
    assert actions["cache"].option_strings == ["--no-cache"]
    assert actions["out"].required and not actions["lr"].required
    assert flag_name(Cfg, "batch_size") == "batch-size" and flag_name(Cfg, "progress") == "quiet"
    assert flag_name(Cfg, "cache") == "no-cache" and flag_name(object(), "pc_k") == "pc-k"


def test_help_choices_and_metavar_from_metadata():
    text = parser().format_help()
    flat = " ".join(text.split())
    assert "--epochs EPOCHS default: 50 (gdas: 250)" in flat  # None: the paper default, told by the help
    assert "--lr LR default: 0.025" in flat
    assert "--space {darts,nb201} search space (default: darts)" in flat
    assert "--precision {fp32,bf16}" in flat
    assert "--reductions I,J" in flat and "--max-memory SIZE" in flat
    assert "--splits SPLITS default: train,test" in flat and "--betas BETAS default: 0.5,0.999" in flat
    assert "--quiet no progress bars" in flat and "--resume continue the run" in flat
    assert "(default: None)" not in flat and "default: True" not in flat


def test_skip_and_overrides():
    p = parser(skip=("momentum", "betas"), overrides={"lr": dict(default=0.5, help="weight lr"),
                                                     "space": dict(flag="search-space")})
    args = p.parse_args(["--out", "o", "--search-space", "nb201"])
    assert not hasattr(args, "momentum") and args.lr == 0.5 and args.space == "nb201"
    assert "weight lr (default: 0.5)" in " ".join(p.format_help().split())
    assert config_from_args(Cfg, args, batch_size=2) == Cfg(out="o", lr=0.5, space="nb201", batch_size=2)
    with pytest.raises(TypeError, match="no field"):
        parser(overrides={"nope": {}})


def test_refusals():
    p = parser()
    for argv, match in ((["--space", "x"], "invalid choice"), (["--precision", "fp8"], "invalid choice"),
                        (["--epochs", "many"], "invalid int value"), (["--betas", "1"], "expected 2 comma-separated"),
                        (["--reductions", "1,a"], "expected comma-separated integers, got '1,a'"),
                        (["--resume", "--overwrite"], "not allowed with argument")):
        with pytest.raises(argparse.ArgumentError, match=match):
            p.parse_args(["--out", "o", *argv])


def test_unsupported_annotation_refused():
    @dataclass
    class Bad:
        size: int | str = 1

    with pytest.raises(TypeError, match=r"Bad\.size.*metadata\['type'\]"):
        add_config_arguments(argparse.ArgumentParser(), Bad)


def test_comma_tuple():
    assert comma_tuple()(" 1, 2 ,3") == (1, 2, 3) and comma_tuple(float, 2)("1,2") == (1.0, 2.0)
    assert comma_tuple(str)("") == ()


def test_check_positive():
    c = Cfg(out="o", epochs=3, batch_size=np.int64(4))
    check_positive(c, ("epochs", "batch_size"))
    for kw, shown in ((dict(batch_size=0), "--batch-size must be a positive integer, got 0"),
                      (dict(batch_size=-2), "--batch-size must be a positive integer, got -2"),
                      (dict(batch_size=2.5), "--batch-size must be a positive integer, got 2.5"),
                      (dict(batch_size=True), "--batch-size must be a positive integer, got True"),
                      (dict(epochs=None), "--epochs must be a positive integer, got None")):
        with pytest.raises(KtnasError) as e:
            check_positive(Cfg(out="o", **{"epochs": 1, **kw}), ("epochs", "batch_size"))
        assert str(e.value) == shown


def test_parse_size():
    assert parse_size("2GiB") == 2 << 30 and parse_size("1500MiB") == 1500 << 20
    assert parse_size("8GB") == 8 * 10 ** 9 and parse_size("512 mb") == 512 * 10 ** 6
    assert parse_size("1.5G") == 3 << 29 and parse_size("64M") == 64 << 20 and parse_size("4k") == 4096
    assert parse_size("123456") == 123456 and parse_size(4096) == 4096 and parse_size(np.int32(7)) == 7
    for bad in ("", "lots", "2 GiBs", "-1GiB", "0", "1e9", True):
        with pytest.raises(KtnasError, match="bad size") as e:
            parse_size(bad)
        assert "\n" not in str(e.value)


def test_format_bytes():
    assert format_bytes(0) == "0 B" and format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(684 << 20) == "684.0 MiB"
    assert format_bytes(2 << 30) == "2.0 GiB" and format_bytes(5 << 40) == "5.0 TiB"
    assert format_bytes(5 << 50) == "5120.0 TiB"
