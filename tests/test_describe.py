"""`jaxreshard inspect` of sources that are not plain checkpoints: an orbax folder lists its arrays; a damaged
checkpoint is reported as damaged (before: "not a MindSpore strategy file"); a strategy file still shows its
layouts. Expected shapes and dtypes come from the example generator and the fixture files, not the readers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from jaxreshard.cli import main
from jaxreshard.example import llama_params

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mindspore"


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def orbax_ck(llama, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("orbax") / "ck"
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--output-format", "orbax", "-q"]) == 0
    return dst


def test_inspect_an_orbax_folder_lists_its_arrays(capsys, orbax_ck):
    code, out, err = _run(capsys, ["inspect", orbax_ck])
    assert code == 0, err
    params = list(llama_params())
    assert f"orbax checkpoint, {len(params)} array(s)" in out
    for name, dtype, shape in params:
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert str(np.dtype(dtype)) in line and str(list(shape)) in line, line
    total = sum(np.dtype(d).itemsize * int(np.prod(s, dtype=np.int64)) for _, d, s in params)
    assert re.search(rf"total: {len(params)} arrays, {total / 2**20:.2f} MiB", out), out


def test_inspect_an_orbax_folder_with_a_relative_path(capsys, orbax_ck, monkeypatch):
    monkeypatch.chdir(orbax_ck.parent)
    code, out, err = _run(capsys, ["inspect", orbax_ck.name])
    assert code == 0, err
    assert "orbax checkpoint" in out


@pytest.mark.parametrize(("name", "cut", "words"), [
    ("model.safetensors", 5000, ("data ends at byte", "truncated")),
    ("checkpoint.ckpt", 4150, ("record 1", "truncated")),
])  # fmt: skip
def test_inspect_a_truncated_checkpoint_says_truncated(capsys, tmp_path, llama, name, cut, words):
    source = llama if name.endswith(".safetensors") else FIXTURES / "ckpt/complete/rank_0/checkpoint_0.ckpt"
    path = tmp_path / name
    path.write_bytes(Path(source).read_bytes()[:cut])
    code, out, err = _run(capsys, ["inspect", path])
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert str(path) in line and "strategy" not in line
    for word in words:
        assert word in line, line


def test_inspect_a_strategy_file_still_shows_its_layouts(capsys):
    code, out, err = _run(capsys, ["inspect", FIXTURES / "strategy/dp2mp2.ckpt"])
    assert code == 0, err
    assert "MindSpore strategy, 8 parameters" in out


def test_inspect_a_file_that_is_neither_names_the_strategy_reader(capsys, tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"\x08\x01\x12\xff")
    code, _, err = _run(capsys, ["inspect", path])
    assert code == 2 and "not a MindSpore strategy file" in err


def _fake_plan(dp: int, files: int):
    """A plan of `dp` x mp 4 ranks over a complete source whose 2 * `files` tensors lie in `files` files."""
    from jaxreshard.formats.base import TensorEntry
    from jaxreshard.layout import layout_from_dict
    from jaxreshard.plan import make_plan

    f32 = np.dtype(np.float32)
    entries = {0: {f"t{i}.{k}": TensorEntry(f"t{i}.{k}", f32, (8, 2), Path(f"/fake/part_{i}.st"), ((0, 0),))
                   for i in range(files) for k in "ab"}}
    layout = layout_from_dict({"mesh": {"dp": dp, "mp": 4}, "params": [{"match": r".*\.a", "spec": ["mp", None]}]})
    return make_plan(entries, None, layout)


def test_plan_of_many_ranks_lists_equal_ranks_as_one_line_and_many_files_by_first_and_last():
    from jaxreshard.describe import describe_plan

    lines = list(describe_plan(_fake_plan(dp=8, files=10)))
    # every rank writes 10 row blocks of 2x2 floats and 10 whole 8x2 tensors, reading all 10 files
    per_rank = 10 * (2 * 2 + 8 * 2) * 4
    assert lines[:3] == [
        "32 destination rank(s), 20 parameter(s)",
        f"ranks 0-31 (32 rank(s), e.g. rank_0/checkpoint_0.safetensors): params 20  read {per_rank} B  "
        f"write {per_rank} B each",
        "    from 10 source files: /fake/part_0.st ... /fake/part_9.st",
    ]
    assert lines[3].startswith("total: ") and len(lines) == 6  # then the peak, and the host memory line


def test_plan_of_few_ranks_still_lists_every_rank_and_file():
    from jaxreshard.describe import describe_plan

    lines = list(describe_plan(_fake_plan(dp=2, files=3)))
    assert lines[0] == "8 destination rank(s), 6 parameter(s)"
    assert lines[1] == "rank 0: rank_0/checkpoint_0.safetensors  params 6  read 240 B  write 240 B"
    assert lines[2:5] == [f"    from /fake/part_{i}.st" for i in range(3)]
    assert sum(line.startswith("rank ") for line in lines) == 8


# --- host memory next to the plan's predicted peak (the local I/O engine's slice of issue 12) ---


def test_available_memory_is_read_from_meminfo(tmp_path):
    from jaxreshard.describe import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684084 kB\nMemFree:  100 kB\nMemAvailable:   23407732 kB\n")
    assert available_memory(meminfo) == 23407732 * 1024
    meminfo.write_text("MemTotal:       24684084 kB\n")  # a kernel without the field
    assert available_memory(meminfo) is None
    assert available_memory(tmp_path / "absent") is None


def test_the_host_memory_line_warns_once_when_the_peak_would_not_fit(caplog, monkeypatch):
    import logging

    from jaxreshard import describe

    monkeypatch.setattr(describe, "io_buffer_bytes", lambda: 64 << 20)
    with caplog.at_level(logging.WARNING, logger="jaxreshard.describe"):
        fits = describe.host_memory_line(1 << 30, 4 << 30)
        assert caplog.records == []
        tight = describe.host_memory_line(4 << 30, 4 << 30)
    assert fits == "host memory: predicted peak 1.06 GiB (tensors + I/O buffers), available 4.00 GiB (fits)"
    assert tight.endswith("available 4.00 GiB (DOES NOT FIT)") and "4.06 GiB" in tight
    (record,) = caplog.records
    assert "4.06 GiB exceeds this host's available memory 4.00 GiB" in record.getMessage()
    assert "\n" not in record.getMessage()
    assert describe.host_memory_line(0, None).endswith("available memory unknown (no /proc/meminfo MemAvailable)")


def test_plan_prints_the_host_memory_line(capsys, llama):
    from jaxreshard.describe import available_memory

    code, out, _ = _run(capsys, ["plan", "--src", llama, "--dst-layout", "configs/layouts/llama_dp2mp4.yaml"])
    assert code == 0
    (line,) = [x for x in out.splitlines() if x.startswith("host memory: predicted peak ")]
    assert available_memory() is None or re.search(r"available [\d.]+ [KMGT]iB \((fits|DOES NOT FIT)\)$", line)
