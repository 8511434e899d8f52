"""Job and layout YAML: safe against alias bombs, deep nesting, huge or special files; one-line errors."""

import os
import resource
import time

import pytest

from jaxreshard.caps import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES
from jaxreshard.errors import ConfigError
from jaxreshard.yamlfile import load_yaml


def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb: 9 levels of 9 aliases each expand to 9**9 (387 million) strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def load(tmp_path, content, name="job.yaml"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return load_yaml(path, ConfigError, "job config")


def refused(tmp_path, content, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load(tmp_path, content)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_alias_bomb_refused_without_expanding(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    refused(tmp_path, billion_laughs(), rf"line \d+, column \d+: expands .* over {MAX_YAML_NODES} nodes")
    assert time.monotonic() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB: under 50 MiB more


def test_small_anchors_still_work(tmp_path):
    assert load(tmp_path, "a: &x [1, 2]\nb: *x\nc: {<<: {k: 1}, j: 2}\n") == {
        "a": [1, 2], "b": [1, 2], "c": {"k": 1, "j": 2}}


def test_three_level_bomb_is_small_enough(tmp_path):
    assert len(load(tmp_path, billion_laughs(3))["a2"]) == 9  # 9**3 = 729 strings: under the cap


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"a: \xff\xfe\n", r"not UTF-8 text \(byte 0xff at offset 3\)"),
        (b"a: b\x00\n", r"special characters are not allowed #x0000"),
        ("[" * 200 + "]" * 200, rf"line 1, column {MAX_YAML_DEPTH + 1}: nested deeper than {MAX_YAML_DEPTH}"),
        ("a: [1, 2\nb: c\n", r"job\.yaml: job config is not valid YAML: line 2, column 2: while parsing a flow"),
        ("a: &x [*x]\n", r"recursive alias"),
        ("a: *nope\n", r"line 1, column 4: found undefined alias 'nope'"),
        ("a: 1\nb: 2\na: 3\n", r"line 3, column 1: duplicate key 'a'"),
        ("a: !!python/object:os.system x\n", r"could not determine a constructor"),
        ("a: " + "9" * 5000 + "\n", r"holds a value YAML cannot represent"),
    ],
)
def test_refused_documents(tmp_path, content, pattern):
    refused(tmp_path, content, pattern)


def test_size_cap(tmp_path):
    refused(tmp_path, "a: " + "x" * MAX_YAML_BYTES, rf"over the cap of {MAX_YAML_BYTES}")


def test_only_regular_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    start = time.monotonic()
    for path in (tmp_path / "fifo", "/dev/zero", tmp_path):
        with pytest.raises(ConfigError, match="not a regular file"):
            load_yaml(path, ConfigError, "job config")
    assert time.monotonic() - start < 2
    with pytest.raises(ConfigError, match="cannot read job config: No such file"):
        load_yaml(tmp_path / "missing", ConfigError, "job config")
