"""`--ranks`: parsed strictly, capped before any range is expanded."""

import time

import pytest

from jaxreshard.caps import MAX_RANKS
from jaxreshard.errors import ConfigError
from jaxreshard.run import parse_ranks


def test_rank_lists():
    assert parse_ranks("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_ranks(" 5 - 6 , 2 ") == [2, 5, 6]
    assert parse_ranks("3,3,1-3") == [1, 2, 3]
    assert parse_ranks(None) is None and parse_ranks("") is None
    assert parse_ranks(f"0-{MAX_RANKS - 1}") == list(range(MAX_RANKS))


@pytest.mark.parametrize("text", ["x", "3-1", "1,,2", "-1", "5-", "\u0663", "1_0", "+3", "0x10", "1.5"])
def test_not_rank_lists(text):
    with pytest.raises(ConfigError, match="is not a rank list"):
        parse_ranks(text)


@pytest.mark.parametrize("text", ["0-300000000", str(MAX_RANKS), "9" * 5000, f"1,{2**64}"])
def test_beyond_the_cap_refused_at_once(text):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"beyond the cap of {MAX_RANKS} ranks"):
        parse_ranks(text)
    assert time.monotonic() - start < 0.5
