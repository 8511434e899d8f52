"""Numeric CLI options: strict integers within caps, finite floats, positive sizes."""

import pytest

from jaxreshard.caps import MAX_PROCESSES
from jaxreshard.cli import _float, _int, _size
from jaxreshard.errors import ConfigError


def test_integers():
    assert _int("4", "--process-num") == 4 and _int(" 2 ", "--process-num") == 2
    assert _int(None, "--process-num") == 1 and _int(None, "--process-id", None) is None
    assert _int("0", "--process-id") == 0 and _int("16383", "--process-id") == 16383


@pytest.mark.parametrize("value, pattern", [
    ("0", r"--process-num must be an integer in 1..1024, got 0"),
    ("-3", r"in 1..1024, got -3"),
    (str(MAX_PROCESSES + 1), r"in 1..1024"),
    ("9" * 5000, r"in 1..1024"),
    ("2.5", r"must be an integer, got '2.5'"),
    ("True", r"must be an integer, got 'True'"),
    ("\u0663", r"must be an integer"),
    ("1_0", r"must be an integer"),
])
def test_bad_integers(value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _int(value, "--process-num")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_floats(value):
    with pytest.raises(ConfigError, match="--lora-scaling must be a finite number"):
        _float(value, "--lora-scaling")


def test_floats():
    assert _float("0.5", "--lora-scaling") == 0.5 and _float(None, "--lora-scaling") is None
    with pytest.raises(ConfigError, match="must be a number, got 'x'"):
        _float("x", "--lora-scaling")


@pytest.mark.parametrize("value", ["0", "0GB", "0.1"])
def test_sizes_must_be_positive(value):
    with pytest.raises(ConfigError, match="--max-file-size must be at least 1 byte"):
        _size(value, "--max-file-size")


def test_sizes():
    assert _size("5GB", "--max-file-size") == "5GB" and _size(None, "--max-file-size") is None


@pytest.mark.parametrize("flag, value, pattern", [
    ("--process-id", "-1", r"--process-id must be an integer in 0\.\.16383"),
    ("--process-id", "16384", r"in 0\.\.16383"),
    ("--num-processes", "0", r"--num-processes must be an integer in 1\.\.16384"),
])
def test_bounds_per_flag(flag, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _int(value, flag)
