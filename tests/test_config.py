"""Job files: only single values where one is wanted; read through the safe YAML loader."""

import pytest

from jaxreshard.config import options_from, read_job
from jaxreshard.errors import ConfigError


def test_scalars_kept_as_text():
    opts = options_from({"dtype": "bf16", "process_num": 2, "lora_scaling": 0.5, "has_redundancy": True}, "j")
    assert (opts.dtype, opts.process_num, opts.lora_scaling, opts.has_redundancy) == ("bf16", "2", "0.5", "True")
    assert options_from({"layouts": ["a", "b"]}, "j").layouts == ("a", "b")


@pytest.mark.parametrize("values, pattern", [
    ({"dtype": ["bf16"]}, r"j: dtype must be a single value, got a list \['bf16'\]"),
    ({"dst": {"a": 1}}, r"dst must be a single value, got a dict"),
    ({"layouts": [["a"]]}, r"layouts must be a single value, got a list"),
    ({"layouts": {"a": 1}}, r"layouts must be a list of values"),
    ({"quiet": "yes"}, r"quiet must be true or false"),
    ({1: "x"}, r"unknown keys \['1'\]"),
])
def test_wrong_kinds_refused(values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        options_from(values, "j")


def test_read_job(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("task: plan\nsrc: a\ndtype: [bf16, fp16]\n")
    with pytest.raises(ConfigError, match="dtype must be a single value"):
        read_job(path)
    path.write_text("task: [plan]\n")
    with pytest.raises(ConfigError, match=r"task \['plan'\] is unknown"):
        read_job(path)
    path.write_text("task: plan\nsrc: a\n")
    assert read_job(path)[0] == "plan"
