"""--process-num and --ranks (the multi-process / multi-node share of a conversion), through the CLI in process.

- `--process-num N` cuts the destination ranks into N contiguous blocks, one process each; the output is the same
  bytes as a single-process run; N must divide the ranks written; any worker failure fails the whole run and
  nothing is committed.
- `--ranks` writes only those destination ranks, each rank folder committed on its own, so several invocations
  fill one destination; rank folders that exist are refused without --overwrite; `plan --ranks` prints only those.

Spawned worker processes import jax (~2-3 s each run), so only three tests use --process-num > 1.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

import jaxreshard.api
from jaxreshard.cli import main
from jaxreshard.formats.manifest import MANIFEST_NAME

from .helpers import tree as outputs  # every file but the manifest, by relative path

FIX = Path(__file__).parent / "fixtures" / "mindspore"
BF16 = np.dtype(ml_dtypes.bfloat16)

DP2MP4 = {
    "mesh": {"dp": 2, "mp": 4},
    "params": [
        {"match": r"a\.weight", "spec": ["mp", None]},
        {"match": r"b\.weight", "spec": [None, "mp"]},
        {"match": r"c\.bias", "spec": ["mp"]},
        {"match": ".*", "spec": []},
    ],
}
MP4 = {**DP2MP4, "mesh": {"mp": 4}}


def sha_tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
    return out




def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def run_ok(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def run_2(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2, f"exit {code}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def native(tmp_path):
    """A small complete safetensors checkpoint and the dp2mp4 / mp4 layout YAMLs, all in tmp_path/in."""
    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(42)
    save_file({
        "a.weight": rng.standard_normal((8, 16)).astype(np.float32),
        "b.weight": rng.standard_normal((16, 8)).astype(np.float32).astype(BF16),
        "c.bias": rng.standard_normal(8).astype(np.float16),
        "step": np.array(12345, dtype=np.int64),
        "mask": rng.integers(0, 2, 8).astype(np.bool_),
    }, root / "model.safetensors")  # fmt: skip
    (root / "dp2mp4.yaml").write_text(yaml.safe_dump(DP2MP4, sort_keys=False))
    (root / "mp4.yaml").write_text(yaml.safe_dump(MP4, sort_keys=False))
    return root


def split(capsys, native: Path, dst: Path, *extra) -> Path:
    run_ok(capsys, "convert", "--src", native / "model.safetensors", "--dst", dst,
           "--dst-layout", native / "dp2mp4.yaml", "-q", *extra)  # fmt: skip
    return dst


# ------------------------------------------------------------------------------------------------ --process-num


def test_process_num_2_equals_process_num_1_native(tmp_path, capsys, native):
    before = sha_tree(native)
    one = split(capsys, native, tmp_path / "one", "--process-num", "1")
    two = split(capsys, native, tmp_path / "two", "--process-num", "2")
    assert sorted(p.name for p in two.iterdir() if p.name != MANIFEST_NAME) == [f"rank_{r}" for r in range(8)]
    assert outputs(two) == outputs(one)
    assert leftovers(tmp_path) == []
    assert sha_tree(native) == before


def test_process_num_2_matches_mindspore(tmp_path, capsys):
    src = tmp_path / "in" / "complete"
    shutil.copytree(FIX / "ckpt/complete", src)
    strategy = shutil.copy2(FIX / "strategy/dp2mp4.ckpt", tmp_path / "in" / "dp2mp4.ckpt")
    dst = tmp_path / "out"
    run_ok(capsys, "convert", "--src", src, "--dst", dst, "--dst-strategy", strategy, "--process-num", "2", "-q")
    assert outputs(dst) == outputs(FIX / "ckpt/dp2mp4")
    assert leftovers(tmp_path) == []


def test_process_num_that_does_not_divide_the_ranks(tmp_path, capsys, native):
    msg = run_2(capsys, "convert", "--src", native / "model.safetensors", "--dst", tmp_path / "out",
                "--dst-layout", native / "dp2mp4.yaml", "--process-num", "3", "-q")  # fmt: skip
    assert "3" in msg and "process" in msg.lower()
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_process_num(tmp_path, capsys, native, value):
    run_2(capsys, "convert", "--src", native / "model.safetensors", "--dst", tmp_path / "out",
          "--dst-layout", native / "dp2mp4.yaml", f"--process-num={value}", "-q")  # fmt: skip
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _truncate_after_header(path: Path) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[: 8 + n + 1])


def test_truncated_source_in_a_multi_process_run(tmp_path, capsys, native):
    """dp2mp4 -> mp4 in 2 processes: destination ranks 2-3 (second block) read source rank 3. Planning may
    already catch the truncation; either way: exit 2, no destination."""
    dist = split(capsys, native, tmp_path / "in" / "dist")
    _truncate_after_header(dist / "rank_3" / "checkpoint_3.safetensors")
    before = sha_tree(tmp_path / "in")
    msg = run_2(capsys, "convert", "--src", dist, "--src-layout", native / "dp2mp4.yaml", "--dst", tmp_path / "out",
                "--dst-layout", native / "mp4.yaml", "--process-num", "2", "-q")  # fmt: skip
    assert "checkpoint_3" in msg or re.search(r"rank[ _]?3\b", msg), msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert sha_tree(tmp_path / "in") == before


def test_worker_failure_fails_the_whole_run(tmp_path, capsys, native, monkeypatch):
    """The source is truncated after planning, so only the second worker (destination ranks 2-3, reading source
    rank 3) meets it: exit 2 with the worker's message, and ranks 0-1, finished by the first worker, are not
    committed either."""
    dist = split(capsys, native, tmp_path / "in" / "dist")
    victim = dist / "rank_3" / "checkpoint_3.safetensors"
    plan_conversion = jaxreshard.api.plan_conversion

    def plan_then_truncate(*args, **kwargs):
        job = plan_conversion(*args, **kwargs)
        _truncate_after_header(victim)
        return job

    monkeypatch.setattr(jaxreshard.api, "plan_conversion", plan_then_truncate)
    msg = run_2(capsys, "convert", "--src", dist, "--src-layout", native / "dp2mp4.yaml", "--dst", tmp_path / "out",
                "--dst-layout", native / "mp4.yaml", "--process-num", "2", "-q")  # fmt: skip
    assert "checkpoint_3" in msg, msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ --ranks


def test_ranks_in_two_invocations_equal_a_full_run(tmp_path, capsys, native):
    full = split(capsys, native, tmp_path / "full")
    dst = tmp_path / "parts"
    split(capsys, native, dst, "--ranks", "0-3")
    assert sorted(p.name for p in dst.iterdir() if p.name != MANIFEST_NAME) == [f"rank_{r}" for r in range(4)]
    assert outputs(dst) == {k: v for k, v in outputs(full).items() if int(k.split("/")[0][5:]) < 4}
    assert leftovers(tmp_path) == []
    split(capsys, native, dst, "--ranks", "4-7")
    assert outputs(dst) == outputs(full)
    assert leftovers(tmp_path) == []

    before = sha_tree(dst)
    msg = run_2(capsys, "convert", "--src", native / "model.safetensors", "--dst", dst,
                "--dst-layout", native / "dp2mp4.yaml", "--ranks", "4-7", "-q")  # fmt: skip
    assert "--overwrite" in msg and "rank_4" in msg
    assert sha_tree(dst) == before and leftovers(tmp_path) == []

    split(capsys, native, dst, "--ranks", "4-7", "--overwrite")
    assert outputs(dst) == outputs(full)
    assert leftovers(tmp_path) == []


def test_ranks_list_syntax(tmp_path, capsys, native):
    full = split(capsys, native, tmp_path / "full")
    dst = split(capsys, native, tmp_path / "some", "--ranks", "0-1,5")
    assert sorted(p.name for p in dst.iterdir() if p.name != MANIFEST_NAME) == ["rank_0", "rank_1", "rank_5"]
    assert outputs(dst) == {k: v for k, v in outputs(full).items() if k.split("/")[0] in ("rank_0", "rank_1", "rank_5")}


def test_ranks_overlapping_an_existing_rank_folder_touch_nothing(tmp_path, capsys, native):
    """--ranks 2-5 after --ranks 0-3: rank_2 and rank_3 exist, so nothing is written, not even rank_4/5."""
    dst = split(capsys, native, tmp_path / "parts", "--ranks", "0-3")
    before = sha_tree(dst)
    msg = run_2(capsys, "convert", "--src", native / "model.safetensors", "--dst", dst,
                "--dst-layout", native / "dp2mp4.yaml", "--ranks", "2-5", "-q")  # fmt: skip
    assert "rank_2" in msg
    assert sha_tree(dst) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("ranks", ["9", "0-8", "x", "-1", "3-1"])
def test_bad_ranks(tmp_path, capsys, native, ranks):
    """Ranks the layout lacks, or a list that selects nothing ("3-1"): exit 2, no destination created."""
    msg = run_2(capsys, "convert", "--src", native / "model.safetensors", "--dst", tmp_path / "out",
                "--dst-layout", native / "dp2mp4.yaml", f"--ranks={ranks}", "-q")  # fmt: skip
    if ranks in ("9", "0-8"):
        assert re.search(r"\b[89]\b", msg), msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_ranks_with_mindspore_strategy(tmp_path, capsys):
    src = tmp_path / "in" / "complete"
    shutil.copytree(FIX / "ckpt/complete", src)
    strategy = shutil.copy2(FIX / "strategy/dp2mp4.ckpt", tmp_path / "in" / "dp2mp4.ckpt")
    dst = tmp_path / "out"
    run_ok(capsys, "convert", "--src", src, "--dst", dst, "--dst-strategy", strategy, "--ranks", "0-3", "-q")
    want = {k: v for k, v in outputs(FIX / "ckpt/dp2mp4").items() if int(k.split("/")[0][5:]) < 4}
    assert outputs(dst) == want
    run_ok(capsys, "convert", "--src", src, "--dst", dst, "--dst-strategy", strategy, "--ranks", "4-7", "-q")
    assert outputs(dst) == outputs(FIX / "ckpt/dp2mp4")


def test_plan_with_one_rank_prints_only_that_rank(tmp_path, capsys, native):
    out = run_ok(capsys, "plan", "--src", native / "model.safetensors", "--dst", tmp_path / "out",
                 "--dst-layout", native / "dp2mp4.yaml", "--ranks", "1", "-q")  # fmt: skip
    text = out.replace(str(tmp_path), "TMP")
    assert {int(n) for n in re.findall(r"\brank[ _](\d+)", text)} == {1}, out
    assert not (tmp_path / "out").exists()
