"""The static backtracking check of layout `match` regexes."""

import re
import time

import pytest

from jaxreshard.caps import MAX_NAME_CHARS
from jaxreshard.errors import LayoutError
from jaxreshard.saferegex import backtracking_risk, compile_safe

SHIPPED = [r"model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.weight", r"(adam_[mv]\.)?layer1\.weight", r".*",
           r"layer2\.bias|norm\.gamma", r"model\.layers\.(\d+)\..*", r"train_state\..*", r"(\d{1,3}\.){3}\d+",
           r"a*+b*+c*+d*+e", r"(?=.*x)\w+", r".*\.layers\.(\d+)\..*"]
EXPONENTIAL = [r"(a+)+$", r"(.*)*x", r"(a|aa)*b", r"(x+x+)+y", r"((ab)*)*c", r"(a*){3}", r"(?:a|a)*", r"(?>a*)*",
               r"(\w+\s?)*$", r"(a{2,}){2,}", r"(?:a{1,30}){1,30}b", r"(a?){30}a{30}", "a?" * 30 + "a" * 30,
               r"(a|aa){40}b"]


@pytest.mark.parametrize("pattern", SHIPPED)
def test_ordinary_patterns_pass(pattern):
    assert backtracking_risk(pattern) is None


@pytest.mark.parametrize("pattern", EXPONENTIAL)
def test_catastrophic_patterns_refused(pattern):
    assert backtracking_risk(pattern)
    with pytest.raises(LayoutError, match="exponential or very long time"):
        compile_safe(pattern, "x.yaml: params[0]", LayoutError)


@pytest.mark.parametrize("pattern", SHIPPED)
def test_accepted_patterns_match_long_names_fast(pattern):
    """Every accepted pattern on adversarial names at the length cap: each match well under a second."""
    regex = re.compile(pattern)
    for name in ("a" * MAX_NAME_CHARS, "." * MAX_NAME_CHARS, "ab" * (MAX_NAME_CHARS // 2),
                 "1." * (MAX_NAME_CHARS // 2)):
        start = time.monotonic()
        regex.fullmatch(name)
        assert time.monotonic() - start < 1


def test_not_a_string_or_not_a_regex():
    with pytest.raises(LayoutError, match="match must be a regex string, got int"):
        compile_safe(3, "w", LayoutError)
    with pytest.raises(LayoutError, match="bad regex"):
        compile_safe("(", "w", LayoutError)
