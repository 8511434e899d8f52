"""Fuzzing the PEFT adapter-config parser: random, structured and mutated configs give a scale or a
jaxreshard error (one line, naming the file), never another exception, in bounded time."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxreshard.errors import JaxreshardError
from jaxreshard.lora import read_scaling

SETTINGS = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
MODULES = ("model.layers.0.self_attn.q_proj", "v_proj", "")
VALID = json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_rslora": False,
                    "alpha_pattern": {"q_proj": 4}, "rank_pattern": {"v_proj": 2}, "fan_in_fan_out": False}).encode()

json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
             | st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) |
                          st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
pattern_key = st.sampled_from(["q_proj", "(q", "(a+)+", ".*", "[", "v_proj$", "\\", "(?i)q", "layers\\.0"]) | \
    st.text(max_size=10)
config = st.fixed_dictionaries({}, optional={
    "r": json_value, "lora_alpha": json_value, "target_modules": json_value, "use_rslora": json_value,
    "fan_in_fan_out": json_value,
    "alpha_pattern": json_value | st.dictionaries(pattern_key, json_value, max_size=3),
    "rank_pattern": json_value | st.dictionaries(pattern_key, json_value, max_size=3),
})  # fmt: skip


def check(raw: bytes) -> None:
    """Parse `raw` as an adapter's config and scale every module: a finite float or a JaxreshardError."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp)
        (adapter / "adapter_config.json").write_bytes(raw)
        try:
            scaling = read_scaling(None, adapter)
            for module in MODULES:
                assert math.isfinite(scaling.for_module(module))
        except JaxreshardError as e:
            assert "\n" not in str(e)
            assert "adapter_config.json" in str(e) or "scale" in str(e)


@SETTINGS
@given(config)
def test_structured_configs(cfg):
    check(json.dumps(cfg, allow_nan=True).encode())


@SETTINGS
@given(json_value)
def test_any_json_document(value):
    check(json.dumps(value, allow_nan=True).encode())


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes(raw):
    check(raw)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_valid_config(flips):
    raw = bytearray(VALID)
    for at, byte in flips:
        raw[at] = byte
    check(bytes(raw))


def test_valid_config_scales():
    """The unmutated config is accepted: q 4/8, v 16/2, anything else 16/8 (so mutations start from a valid one)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "adapter_config.json").write_bytes(VALID)
        scaling = read_scaling(None, Path(tmp))
        assert [scaling.for_module(m) for m in ("a.q_proj", "a.v_proj", "a.o_proj")] == [0.5, 8.0, 2.0]
