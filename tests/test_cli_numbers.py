"""Numeric options: strict integers within caps, finite floats, positive sizes (parsed once, when a command's
options are built: `jaxreshard.commands.options`)."""

import pytest

from jaxreshard.caps import MAX_PROCESSES
from jaxreshard.commands.options import PROCESS_COUNT, PROCESS_INDEX, WORKER_COUNT, parse_bytes, parse_number
from jaxreshard.errors import ConfigError


def test_integers():
    assert WORKER_COUNT("4", "--workers") == 4 and WORKER_COUNT(" 2 ", "--process-num") == 2
    assert PROCESS_INDEX("0", "--process-id") == 0 and PROCESS_INDEX("16383", "--process-id") == 16383


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
        WORKER_COUNT(value, "--process-num")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_floats(value):
    with pytest.raises(ConfigError, match="--lora-scaling must be a finite number"):
        parse_number(value, "--lora-scaling")


def test_floats():
    assert parse_number("0.5", "--lora-scaling") == 0.5 and parse_number("-2", "--lora-scaling") == -2.0
    with pytest.raises(ConfigError, match="must be a number, got 'x'"):
        parse_number("x", "--lora-scaling")


@pytest.mark.parametrize("value", ["0", "0GB", "0.1"])
def test_sizes_must_be_positive(value):
    with pytest.raises(ConfigError, match="--max-file-size must be at least 1 byte"):
        parse_bytes(value, "--max-file-size")


def test_sizes():
    assert parse_bytes("5GB", "--max-file-size") == 5 * 10**9
    assert parse_bytes("500MiB", "--max-file-size") == 500 * 2**20 and parse_bytes("1000", "-") == 1000


@pytest.mark.parametrize("kind, flag, value, pattern", [
    (PROCESS_INDEX, "--process-id", "-1", r"--process-id must be an integer in 0\.\.16383"),
    (PROCESS_INDEX, "--process-id", "16384", r"in 0\.\.16383"),
    (PROCESS_COUNT, "--num-processes", "0", r"--num-processes must be an integer in 1\.\.16384"),
])
def test_bounds_per_flag(kind, flag, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        kind(value, flag)
