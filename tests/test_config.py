"""Job files: each task's own keys, typed values, only single values where one is wanted; read through the safe
YAML loader."""

import pytest

from jaxreshard.config import options_from, read_job
from jaxreshard.errors import ConfigError


def test_values_are_typed():
    opts = options_from("convert", {"src": "a", "dst": "b", "dtype": "bf16", "process_num": 2,
                                    "max_file_size": "2KiB", "ranks": "0-2,5"}, "j")
    assert (opts.dtype, opts.workers, opts.max_file_size, opts.ranks) == ("bf16", 2, 2048, (0, 1, 2, 5))
    lora = options_from("merge-lora", {"src": "a", "dst": "b", "lora_scaling": 0.5}, "j")
    assert lora.lora_scaling == 0.5 and type(lora.lora_scaling) is float
    unify = options_from("unify", {"src": "a", "dst": "b", "has_redundancy": True}, "j")
    assert unify.has_redundancy is True and unify.max_file_size == 5 * 10**9 and unify.workers == 1
    assert options_from("quickstart", {"layouts": ["a", "b"]}, "j").layouts == ("a", "b")


@pytest.mark.parametrize("values, pattern", [
    ({"dtype": ["bf16"]}, r"j: dtype must be a single value, got a list \['bf16'\]"),
    ({"dst": {"a": 1}}, r"dst must be a single value, got a dict"),
    ({"quiet": "yes"}, r"quiet must be true or false"),
    ({1: "x"}, r"unknown keys \['1'\]"),
    ({"workers": "0"}, r"j: workers must be an integer in 1\.\.1024, got 0"),
    ({"process_num": True}, r"j: process_num must be an integer, got 'True'"),
    ({"workers": 2, "process_num": 2}, r"j: give workers or process_num, not both"),
])
def test_wrong_kinds_refused(values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        options_from("convert", {"src": "a", "dst": "b", **values}, "j")


@pytest.mark.parametrize("values, pattern", [
    ({"layouts": [["a"]]}, r"layouts must be a single value, got a list"),
    ({"layouts": {"a": 1}}, r"layouts must be a list of values"),
])
def test_list_values(values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        options_from("quickstart", values, "j")


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
    path.write_text("dst: b\n")  # convert, by default
    with pytest.raises(ConfigError, match=r"job\.yaml: missing required key\(s\) src$"):
        read_job(path)
