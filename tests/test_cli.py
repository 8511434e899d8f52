"""The command line, in process (`jaxreshard.cli.main`), plus one end-to-end subprocess run of the quickstart.

Expected shards are computed here from the layout contract (row-major ranks over the mesh axes as written,
list-of-axes specs major first, global rank = stage * devices_per_stage + local rank) and numpy slices; files
are read back with the `safetensors` package, never with jaxreshard's reader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxreshard.cli import main
from jaxreshard.formats.manifest import MANIFEST_NAME

from .helpers import block_slices

REPO_ROOT = Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)

# ------------------------------------------------------------------------------------------------ builders


def make_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        "a.weight": rng.standard_normal((8, 16)).astype(np.float32),
        "b.weight": rng.standard_normal((16, 8)).astype(np.float32).astype(BF16),
        "c.bias": rng.standard_normal(8).astype(np.float16),
        "step": np.array(987654321012, dtype=np.int64),
        "scale": np.array(0.1234567890123, dtype=np.float64),
        "mask": rng.integers(0, 2, 8).astype(np.bool_),
    }


# Layouts as data: (mesh, pipeline_stages, [(regex, spec, stage)]); written to YAML for the CLI and used here
# to compute the expected blocks independently.
DP2MP4 = ({"dp": 2, "mp": 4}, 1, [
    (r"a\.weight", ["mp", None], None),
    (r"b\.weight", [None, "mp"], None),
    (r"c\.bias", ["mp"], None),
    (r".*", [], None),
])  # fmt: skip
MP4 = ({"mp": 4}, 1, [
    (r"a\.weight", ["mp", None], None),
    (r"b\.weight", [None, "mp"], None),
    (r"c\.bias", ["mp"], None),
    (r".*", [], None),
])  # fmt: skip
MULTI = ({"mp": 2, "dp": 4}, 1, [  # list-of-axes specs, axes listed in the non-alphabetical order
    (r"a\.weight", [["dp", "mp"], None], None),
    (r"b\.weight", ["dp", "mp"], None),
    (r"c\.bias", [["mp", "dp"]], None),
    (r"mask", ["dp"], None),
    (r".*", [], None),
])  # fmt: skip
PP2 = ({"dp": 2, "mp": 2}, 2, [
    (r"a\.weight", ["mp", None], 0),
    (r"b\.weight", [None, "mp"], -1),
    (r"c\.bias", [], 1),
    (r"step", [], None),  # stage 0 by default
])  # unmatched names (scale, mask) are on every stage  # fmt: skip


def write_layout(path: Path, layout) -> Path:
    mesh, stages, rules = layout
    params = []
    for regex, spec, stage in rules:
        rule = {"match": regex, "spec": spec}
        if stage is not None:
            rule["stage"] = stage
        params.append(rule)
    path.write_text(yaml.safe_dump({"mesh": mesh, "pipeline_stages": stages, "params": params}, sort_keys=False))
    return path


def expected_rank_tensors(tensors: dict[str, np.ndarray], layout, rank: int) -> dict[str, np.ndarray]:
    """What global `rank` must hold under `layout`, from the issue's contract."""
    mesh, stages, rules = layout
    names, sizes = list(mesh), list(mesh.values())
    per_stage = math.prod(sizes)
    stage, local = divmod(rank, per_stage)
    coords = dict(zip(names, np.unravel_index(local, sizes)))
    out = {}
    for param, array in tensors.items():
        rule = next((r for r in rules if re.fullmatch(r[0], param)), None)
        spec, param_stages = ([], range(stages)) if rule is None else (rule[1], [(rule[2] or 0) % stages])
        if stage not in param_stages:
            continue
        out[param] = array[block_slices(array.shape, spec, mesh, coords)]
    return out


def num_ranks(layout) -> int:
    return math.prod(layout[0].values()) * layout[1]


def sha_tree(root: Path) -> dict[str, str]:
    """sha256 of every file, plus every directory (as ''), under `root` (or of `root` itself)."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
    return out


def assert_same_tensors(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], where: str = "") -> None:
    assert sorted(got) == sorted(expected), where
    for name, array in expected.items():
        assert got[name].dtype == array.dtype, (where, name, got[name].dtype, array.dtype)
        assert got[name].shape == array.shape, (where, name, got[name].shape, array.shape)
        assert got[name].tobytes() == array.tobytes(), (where, name)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture
def ckpt(tmp_path):
    """A complete safetensors checkpoint in tmp_path/src/model.safetensors."""
    tensors = make_tensors()
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    path = src_dir / "model.safetensors"
    save_file(tensors, path)
    return path, tensors


@pytest.fixture
def layouts(tmp_path):
    d = tmp_path / "layouts"
    d.mkdir()
    return {
        name: write_layout(d / f"{name}.yaml", layout)
        for name, layout in {"dp2mp4": DP2MP4, "mp4": MP4, "multi": MULTI, "pp2": PP2}.items()
    }


def run_ok(capsys, argv: list[str]) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def check_distributed(dst: Path, tensors: dict[str, np.ndarray], layout, prefix: str = "checkpoint_") -> None:
    n = num_ranks(layout)
    assert sorted(p.name for p in dst.iterdir() if p.name != MANIFEST_NAME) == sorted(f"rank_{r}" for r in range(n))
    for rank in range(n):
        files = list((dst / f"rank_{rank}").iterdir())
        assert [f.name for f in files] == [f"{prefix}{rank}.safetensors"]
        assert_same_tensors(load_file(files[0]), expected_rank_tensors(tensors, layout, rank), f"rank {rank}")


def complete_file(dst: Path) -> Path:
    files = sorted(p for p in dst.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    assert files == [dst / "rank_0" / "checkpoint_0.safetensors"]
    return files[0]


def split(capsys, src: Path, dst: Path, layout_path: Path) -> Path:
    run_ok(capsys, ["convert", "--src", src, "--dst", dst, "--dst-layout", layout_path, "-q"])
    return dst


# ------------------------------------------------------------------------------------------------ convert


@pytest.mark.parametrize("name", ["dp2mp4", "multi", "pp2"])
def test_split_then_merge_returns_the_original_bytes(tmp_path, capsys, ckpt, layouts, name):
    src, tensors = ckpt
    before = sha_tree(src.parent)
    layout = {"dp2mp4": DP2MP4, "multi": MULTI, "pp2": PP2}[name]
    dist = split(capsys, src, tmp_path / "dist", layouts[name])
    check_distributed(dist, tensors, layout)
    merged = tmp_path / "merged"
    run_ok(capsys, ["convert", "--src", dist, "--src-layout", layouts[name], "--dst", merged, "-q"])
    assert_same_tensors(load_file(complete_file(merged)), tensors)
    assert sha_tree(src.parent) == before
    assert leftovers(tmp_path) == []


def test_reshard_chain_over_layouts(tmp_path, capsys, ckpt, layouts):
    src, tensors = ckpt
    chain = [("dp2mp4", DP2MP4), ("pp2", PP2), ("multi", MULTI), ("mp4", MP4)]
    cur, cur_layout = split(capsys, src, tmp_path / "0", layouts["dp2mp4"]), layouts["dp2mp4"]
    for i, (name, layout) in enumerate(chain[1:], start=1):
        before = sha_tree(cur)
        nxt = tmp_path / str(i)
        run_ok(capsys, ["convert", "--src", cur, "--src-layout", cur_layout, "--dst", nxt, "--dst-layout",
                        layouts[name], "-q"])  # fmt: skip
        check_distributed(nxt, tensors, layout)
        assert sha_tree(cur) == before
        cur, cur_layout = nxt, layouts[name]
    merged = tmp_path / "merged"
    run_ok(capsys, ["convert", "--src", cur, "--src-layout", cur_layout, "--dst", merged, "-q"])
    assert_same_tensors(load_file(complete_file(merged)), tensors)


def test_prefix_and_output_message(tmp_path, capsys, ckpt, layouts):
    src, tensors = ckpt
    dst = tmp_path / "out"
    out = run_ok(capsys, ["convert", "--src", src, "--dst", dst, "--dst-layout", layouts["mp4"], "--prefix", "w_"])
    check_distributed(dst, tensors, MP4, prefix="w_")
    assert str(dst) in out


def test_complete_to_complete_copies_bytes(tmp_path, capsys, ckpt):
    src, tensors = ckpt
    dst = tmp_path / "copy"
    run_ok(capsys, ["convert", "--src", src, "--dst", dst, "-q"])
    assert_same_tensors(load_file(complete_file(dst)), tensors)
    with safe_open(complete_file(dst), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(tensors)


def test_source_given_as_a_directory_with_one_file(tmp_path, capsys, ckpt, layouts):
    src, tensors = ckpt
    dst = tmp_path / "out"
    run_ok(capsys, ["convert", "--src", src.parent, "--dst", dst, "--dst-layout", layouts["dp2mp4"], "-q"])
    check_distributed(dst, tensors, DP2MP4)


# ------------------------------------------------------------------------------------------------ dtype


def test_dtype_bf16_casts_floats_only(tmp_path, capsys, ckpt):
    src, tensors = ckpt
    dst = tmp_path / "bf16"
    run_ok(capsys, ["convert", "--src", src, "--dst", dst, "--dtype", "bf16", "-q"])
    expected = {
        name: (a.astype(BF16) if np.issubdtype(a.dtype, np.floating) or a.dtype == BF16 else a)
        for name, a in tensors.items()
    }
    assert expected["step"].dtype == np.int64 and expected["mask"].dtype == np.bool_
    assert_same_tensors(load_file(complete_file(dst)), expected)


def test_dtype_f32_on_a_split(tmp_path, capsys, ckpt, layouts):
    src, tensors = ckpt
    dst = tmp_path / "f32"
    run_ok(capsys, ["convert", "--src", src, "--dst", dst, "--dst-layout", layouts["dp2mp4"], "--dtype", "fp32", "-q"])
    cast = {n: (a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) or a.dtype == BF16 else a)
            for n, a in tensors.items()}  # fmt: skip
    check_distributed(dst, cast, DP2MP4)


# ------------------------------------------------------------------------------------------------ plan / inspect


def test_plan_prints_per_rank_lines_and_writes_nothing(tmp_path, capsys, ckpt, layouts):
    src, tensors = ckpt
    dst = tmp_path / "planned"
    before = sha_tree(tmp_path)
    out = run_ok(capsys, ["plan", "--src", src, "--dst", dst, "--dst-layout", layouts["dp2mp4"]])
    assert not dst.exists()
    assert sha_tree(tmp_path) == before
    per_rank = {r: sum(a.nbytes for a in expected_rank_tensors(tensors, DP2MP4, r).values()) for r in range(8)}
    assert set(per_rank.values()) == {220}  # 2*16*4 + 16*2*2 + 2*2 + 8 + 8 + 8
    lines = out.splitlines()
    for rank in range(8):
        mine = [line for line in lines if re.match(rf"\s*rank {rank}\b", line)]
        assert len(mine) == 1, out
        assert f"rank_{rank}/checkpoint_{rank}.safetensors" in mine[0]
        assert re.search(rf"\b{per_rank[rank]} B\b", mine[0]), mine[0]
    assert str(src) in out
    assert "peak" in out.lower()


def test_plan_of_a_merge(tmp_path, capsys, ckpt, layouts):
    src, tensors = ckpt
    dist = split(capsys, src, tmp_path / "dist", layouts["pp2"])
    out = run_ok(capsys, ["plan", "--src", dist, "--src-layout", layouts["pp2"]])
    assert re.search(r"rank 0\b.*rank_0/checkpoint_0\.safetensors", out)
    assert not re.search(r"rank 1\b", out)
    # the merge reads from both pipeline stages
    assert "rank_0" in out and any(f"rank_{r}" in out for r in range(4, 8))
    assert not (tmp_path / "merged").exists()


def test_inspect_complete(capsys, ckpt):
    src, tensors = ckpt
    out = run_ok(capsys, ["inspect", src])
    for name, array in tensors.items():
        line = next(line for line in out.splitlines() if name in line.split())
        assert str(list(array.shape)) in line, line
        assert str(array.dtype) in line, line


def test_inspect_distributed_with_layout_shows_full_shapes(tmp_path, capsys, ckpt, layouts):
    src, tensors = ckpt
    dist = split(capsys, src, tmp_path / "dist", layouts["dp2mp4"])
    out = run_ok(capsys, ["inspect", dist, "--src-layout", layouts["dp2mp4"]])
    for name, array in tensors.items():
        line = next(line for line in out.splitlines() if name in line.split())
        assert str(list(array.shape)) in line, line  # the full shape, not the shard shape
    assert "[2, 16]" not in out.split("a.weight")[1].splitlines()[0]
    assert re.search(r"rank", out)


# ------------------------------------------------------------------------------------------------ --config


def test_config_job_convert(tmp_path, capsys, ckpt, layouts):
    src, tensors = ckpt
    dst = tmp_path / "from_config"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"task": "convert", "src": str(src), "dst": str(dst),
                                   "dst_layout": str(layouts["multi"]), "quiet": True}))  # fmt: skip
    run_ok(capsys, ["--config", job])
    check_distributed(dst, tensors, MULTI)


def test_config_without_task_defaults_to_convert(tmp_path, capsys, ckpt):
    src, tensors = ckpt
    dst = tmp_path / "from_config"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"src": str(src), "dst": str(dst)}))
    run_ok(capsys, ["--config", job])
    assert_same_tensors(load_file(complete_file(dst)), tensors)


def test_config_unknown_keys_exit_2_listing_valid_keys(tmp_path, capsys, ckpt):
    src, _ = ckpt
    dst = tmp_path / "never"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"task": "convert", "src": str(src), "dst": str(dst), "dst-layout": "x.yaml",
                                   "srcc": "y"}))  # fmt: skip
    code = main(["--config", str(job)])
    _, err = capsys.readouterr()
    assert code == 2
    line = one_error_line(err)
    assert "srcc" in line and "dst-layout" in line and str(job) in line
    for key in ("src", "dst", "dst_layout", "src_layout", "prefix", "overwrite"):
        assert re.search(rf"\b{key}\b", line.split("valid")[-1]), (key, line)
    assert not dst.exists()


# ------------------------------------------------------------------------------------------------ --hf


def test_hf_output_with_max_file_size(tmp_path, capsys, ckpt):
    src, tensors = ckpt
    dst = tmp_path / "hf"
    max_bytes = 600
    run_ok(capsys, ["convert", "--src", src, "--dst", dst, "--hf", "--max-file-size", str(max_bytes), "-q"])
    names = sorted(p.name for p in dst.iterdir() if p.name != MANIFEST_NAME)
    parts = [n for n in names if n != "model.safetensors.index.json"]
    assert "model.safetensors.index.json" in names
    n = len(parts)
    assert n >= 2  # a.weight alone is 512 bytes, the rest 304
    assert parts == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    actual_map = {}
    merged = {}
    for part in parts:
        loaded = load_file(dst / part)
        assert loaded, part
        size = sum(a.nbytes for a in loaded.values())
        assert size <= max_bytes or len(loaded) == 1, (part, size)
        for name, array in loaded.items():
            assert name not in merged
            actual_map[name] = part
            merged[name] = array
    assert index["weight_map"] == actual_map
    assert_same_tensors(merged, tensors)

    # the HF directory is itself a valid source
    back = tmp_path / "back"
    run_ok(capsys, ["convert", "--src", dst, "--dst", back, "-q"])
    assert_same_tensors(load_file(complete_file(back)), tensors)


def test_hf_without_max_file_size_is_one_part(tmp_path, capsys, ckpt):
    src, tensors = ckpt
    dst = tmp_path / "hf1"
    run_ok(capsys, ["convert", "--src", src, "--dst", dst, "--hf", "-q"])
    # issue 10: one part is what transformers' save_pretrained writes, `model.safetensors` without an index
    # (this test used to expect model-00001-of-00001.safetensors + index, which transformers' Flax loader cannot read)
    assert sorted(p.name for p in dst.iterdir() if p.name != MANIFEST_NAME) == ["model.safetensors"]
    assert_same_tensors(load_file(dst / "model.safetensors"), tensors)


def test_hf_with_a_dst_layout_is_refused(tmp_path, capsys, ckpt, layouts):
    src, _ = ckpt
    assert_refused(capsys, ["convert", "--src", src, "--dst", tmp_path / "x", "--hf", "--dst-layout",
                            layouts["dp2mp4"]], tmp_path / "x", src.parent, [])  # fmt: skip


# ------------------------------------------------------------------------------------------------ bad input


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("jaxreshard: error:"), err
    assert "Traceback" not in err
    return lines[0]


def assert_refused(capsys, argv, dst: Path, src_root: Path, names: list[str]) -> str:
    """Exit 2, one line naming `names`, no output (dst and temp siblings absent), source unchanged."""
    before = sha_tree(src_root)
    existed = dst.exists()
    dst_before = sha_tree(dst) if existed else None
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2, err
    line = one_error_line(err)
    for name in names:
        assert name in line, (name, line)
    if existed:
        assert sha_tree(dst) == dst_before
    else:
        assert not dst.exists()
    if dst.parent.exists():
        assert leftovers(dst.parent) == []
    assert sha_tree(src_root) == before
    return line


def _truncate(path: Path, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - nbytes)


def test_truncated_complete_source(tmp_path, capsys, ckpt, layouts):
    src, _ = ckpt
    _truncate(src, 5)
    assert_refused(capsys, ["convert", "--src", src, "--dst", tmp_path / "out", "--dst-layout", layouts["dp2mp4"]],
                   tmp_path / "out", src.parent, [str(src)])  # fmt: skip


def test_truncated_rank_file(tmp_path, capsys, ckpt, layouts):
    src, _ = ckpt
    dist = split(capsys, src, tmp_path / "dist", layouts["dp2mp4"])
    victim = dist / "rank_5" / "checkpoint_5.safetensors"
    _truncate(victim, 3)
    assert_refused(capsys, ["convert", "--src", dist, "--src-layout", layouts["dp2mp4"], "--dst", tmp_path / "m"],
                   tmp_path / "m", dist, [str(victim)])  # fmt: skip


def test_header_claims_more_bytes_than_the_file_has(tmp_path, capsys, ckpt):
    src, _ = ckpt
    data = bytearray(src.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 10)
    src.write_bytes(bytes(data))
    assert_refused(capsys, ["convert", "--src", src, "--dst", tmp_path / "out"], tmp_path / "out", src.parent,
                   [str(src)])  # fmt: skip


def test_corrupt_header(tmp_path, capsys, ckpt):
    src, _ = ckpt
    data = bytearray(src.read_bytes())
    data[8:20] = b"#corrupt#!!!"
    src.write_bytes(bytes(data))
    assert_refused(capsys, ["convert", "--src", src, "--dst", tmp_path / "out"], tmp_path / "out", src.parent,
                   [str(src)])  # fmt: skip


def test_corrupt_header_in_plan_and_inspect(tmp_path, capsys, ckpt):
    src, _ = ckpt
    data = bytearray(src.read_bytes())
    data[8:20] = b"#corrupt#!!!"
    src.write_bytes(bytes(data))
    for argv in (["plan", "--src", src], ["inspect", src]):
        code = main([str(a) for a in argv])
        _, err = capsys.readouterr()
        assert code == 2
        assert str(src) in one_error_line(err)


def test_split_that_does_not_divide_a_dimension(tmp_path, capsys, layouts):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "odd.safetensors"
    save_file({"a.weight": np.zeros((6, 4), np.float32), "ok": np.zeros(4, np.float32)}, src)
    assert_refused(capsys, ["convert", "--src", src, "--dst", tmp_path / "out", "--dst-layout", layouts["dp2mp4"]],
                   tmp_path / "out", src_dir, ["a.weight"])  # fmt: skip


def _remove_rank(dist: Path, rank: int) -> None:
    victim = dist / f"rank_{rank}"
    for f in victim.iterdir():
        f.unlink()
    victim.rmdir()


def test_missing_rank_directory(tmp_path, capsys, ckpt, layouts):
    """mp4: rank 3 holds blocks no other rank has."""
    src, _ = ckpt
    dist = split(capsys, src, tmp_path / "dist", layouts["mp4"])
    _remove_rank(dist, 3)
    line = assert_refused(capsys, ["convert", "--src", dist, "--src-layout", layouts["mp4"], "--dst", tmp_path / "m"],
                          tmp_path / "m", dist, [])  # fmt: skip
    assert re.search(r"rank.*\b3\b", line), line


def test_missing_rank_directory_with_data_parallel_replicas(tmp_path, capsys, ckpt, layouts):
    """dp2mp4 as the issue's example: rank_3 is gone (rank_7 holds the same blocks). The layout says 8 ranks
    and the source has 7: the checkpoint is incomplete, which must be reported, not silently patched."""
    src, _ = ckpt
    dist = split(capsys, src, tmp_path / "dist", layouts["dp2mp4"])
    _remove_rank(dist, 3)
    line = assert_refused(capsys, ["convert", "--src", dist, "--src-layout", layouts["dp2mp4"], "--dst",
                                   tmp_path / "m"], tmp_path / "m", dist, [])  # fmt: skip
    assert re.search(r"rank.*\b3\b", line), line


def _drop_param(path: Path, param: str) -> None:
    tensors = load_file(path)
    del tensors[param]
    path.unlink()
    save_file(tensors, path)
    (path.parent.parent / MANIFEST_NAME).unlink(missing_ok=True)  # rewritten by another tool: no longer our output


def test_parameter_absent_from_one_rank_file(tmp_path, capsys, ckpt, layouts):
    src, _ = ckpt
    dist = split(capsys, src, tmp_path / "dist", layouts["mp4"])
    _drop_param(dist / "rank_2" / "checkpoint_2.safetensors", "b.weight")
    line = assert_refused(capsys, ["convert", "--src", dist, "--src-layout", layouts["mp4"], "--dst", tmp_path / "m"],
                          tmp_path / "m", dist, ["b.weight"])  # fmt: skip
    assert re.search(r"\b2\b", line), line


@pytest.mark.parametrize("param", ["b.weight", "step"])
def test_parameter_absent_from_one_rank_file_with_replicas(tmp_path, capsys, ckpt, layouts, param):
    """dp2mp4: rank 2's file lacks a parameter the layout puts there (rank 6 / every rank has a copy).
    The source does not match its layout: refuse it rather than guess."""
    src, _ = ckpt
    dist = split(capsys, src, tmp_path / "dist", layouts["dp2mp4"])
    _drop_param(dist / "rank_2" / "checkpoint_2.safetensors", param)
    line = assert_refused(capsys, ["convert", "--src", dist, "--src-layout", layouts["dp2mp4"], "--dst",
                                   tmp_path / "m"], tmp_path / "m", dist, [param])  # fmt: skip
    assert re.search(r"\b2\b", line), line


def test_parameter_in_hf_index_but_absent(tmp_path, capsys, ckpt):
    src, tensors = ckpt
    hf = tmp_path / "hf_src"
    hf.mkdir()
    save_file(tensors, hf / "model-00001-of-00001.safetensors")
    weight_map = {name: "model-00001-of-00001.safetensors" for name in [*tensors, "ghost.weight"]}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_refused(capsys, ["convert", "--src", hf, "--dst", tmp_path / "out"], tmp_path / "out", hf,
                   ["ghost.weight"])  # fmt: skip


def test_duplicate_parameter_names(tmp_path, capsys):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "dup.safetensors"
    raw = (
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    )
    raw += b" " * (-len(raw) % 8)
    src.write_bytes(struct.pack("<Q", len(raw)) + raw + np.arange(4, dtype=np.float32).tobytes())
    line = assert_refused(capsys, ["convert", "--src", src, "--dst", tmp_path / "out"], tmp_path / "out", src_dir,
                          [str(src)])  # fmt: skip
    assert "'w'" in line or '"w"' in line, line


def test_duplicate_parameter_across_hf_parts(tmp_path, capsys, ckpt):
    src, tensors = ckpt
    hf = tmp_path / "hf_src"
    hf.mkdir()
    save_file({"a.weight": tensors["a.weight"], "step": tensors["step"]}, hf / "model-00001-of-00002.safetensors")
    save_file({"a.weight": tensors["a.weight"], "c.bias": tensors["c.bias"]}, hf / "model-00002-of-00002.safetensors")
    weight_map = {"step": "model-00001-of-00002.safetensors", "a.weight": "model-00002-of-00002.safetensors",
                  "c.bias": "model-00002-of-00002.safetensors"}  # fmt: skip
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_refused(capsys, ["convert", "--src", hf, "--dst", tmp_path / "out"], tmp_path / "out", hf,
                   ["a.weight"])  # fmt: skip


def test_unknown_axis_in_a_spec(tmp_path, capsys, ckpt):
    src, _ = ckpt
    bad = tmp_path / "bad_layout.yaml"
    bad.write_text("mesh: {dp: 2, mp: 4}\nparams:\n  - {match: 'a\\.weight', spec: [tp, null]}\n")
    line = assert_refused(capsys, ["convert", "--src", src, "--dst", tmp_path / "out", "--dst-layout", bad],
                          tmp_path / "out", src.parent, [str(bad)])  # fmt: skip
    assert "tp" in line


def test_unknown_axis_in_a_source_layout(tmp_path, capsys, ckpt, layouts):
    src, _ = ckpt
    dist = split(capsys, src, tmp_path / "dist", layouts["dp2mp4"])
    bad = tmp_path / "bad_layout.yaml"
    bad.write_text("mesh: {dp: 2, mp: 4}\nparams:\n  - {match: 'a\\.weight', spec: [[mp, tp], null]}\n")
    line = assert_refused(capsys, ["convert", "--src", dist, "--src-layout", bad, "--dst", tmp_path / "m"],
                          tmp_path / "m", dist, [str(bad)])  # fmt: skip
    assert "tp" in line


def test_existing_non_empty_dst_without_overwrite(tmp_path, capsys, ckpt, layouts):
    src, tensors = ckpt
    dst = tmp_path / "out"
    (dst / "rank_0").mkdir(parents=True)
    (dst / "rank_0" / "checkpoint_0.safetensors").write_bytes(b"old output")
    (dst / "notes.txt").write_bytes(b"mine")
    line = assert_refused(capsys, ["convert", "--src", src, "--dst", dst, "--dst-layout", layouts["dp2mp4"]],
                          dst, src.parent, [str(dst)])  # fmt: skip
    assert "--overwrite" in line

    run_ok(capsys, ["convert", "--src", src, "--dst", dst, "--dst-layout", layouts["dp2mp4"], "--overwrite", "-q"])
    check_distributed(dst, tensors, DP2MP4)  # the old files are gone, only the new ranks remain
    assert leftovers(tmp_path) == []


def test_empty_existing_dst_is_fine(tmp_path, capsys, ckpt):
    src, tensors = ckpt
    dst = tmp_path / "empty"
    dst.mkdir()
    run_ok(capsys, ["convert", "--src", src, "--dst", dst, "-q"])
    assert_same_tensors(load_file(complete_file(dst)), tensors)


def test_failed_overwrite_keeps_the_old_output(tmp_path, capsys, ckpt):
    src, _ = ckpt
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.bin").write_bytes(b"keep")
    _truncate(src, 5)
    assert_refused(capsys, ["convert", "--src", src, "--dst", dst, "--overwrite"], dst, src.parent, [str(src)])


@pytest.mark.parametrize(("exc", "code"), [(OSError(5, "Input/output error"), 2), (KeyboardInterrupt(), 130)])
def test_failure_during_execution_leaves_no_output(tmp_path, capsys, monkeypatch, ckpt, layouts, exc, code):
    """A read failing after the temporary output exists (an I/O error, Ctrl-C): nothing is left behind.
    Patches the executor's box reader (jaxreshard.fill.read_box) to fail on the third read."""
    import jaxreshard.fill

    src, _ = ckpt
    real = jaxreshard.fill.read_box
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(jaxreshard.fill, "read_box", failing)
    before = sha_tree(src.parent)
    dst = tmp_path / "out"
    got = main(["convert", "--src", str(src), "--dst", str(dst), "--dst-layout", str(layouts["dp2mp4"])])
    _, err = capsys.readouterr()
    assert len(calls) == 3
    assert got == code, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not dst.exists()
    assert leftovers(tmp_path) == []
    assert sha_tree(src.parent) == before


def test_dst_inside_a_distributed_source_is_refused(tmp_path, capsys, ckpt, layouts):
    src, _ = ckpt
    dist = split(capsys, src, tmp_path / "dist", layouts["dp2mp4"])
    assert_refused(capsys, ["convert", "--src", dist, "--src-layout", layouts["dp2mp4"], "--dst", dist / "merged"],
                   dist / "merged", dist, [str(dist)])  # fmt: skip


def test_dst_containing_the_source_file_is_refused_even_with_overwrite(tmp_path, capsys, ckpt):
    src, _ = ckpt
    before = sha_tree(src.parent)
    code = main(["convert", "--src", str(src), "--dst", str(src.parent), "--overwrite"])
    _, err = capsys.readouterr()
    assert code == 2
    assert str(src.parent) in one_error_line(err)
    assert sha_tree(src.parent) == before
    assert leftovers(tmp_path) == []


def test_dst_inside_an_hf_source_is_refused(tmp_path, capsys, ckpt):
    src, _ = ckpt
    hf = tmp_path / "hf"
    run_ok(capsys, ["convert", "--src", src, "--dst", hf, "--hf", "-q"])
    assert_refused(capsys, ["convert", "--src", hf, "--dst", hf / "sub" / "out"], hf / "sub" / "out", hf, [str(hf)])


def test_distributed_source_without_src_layout(tmp_path, capsys, ckpt, layouts):
    src, _ = ckpt
    dist = split(capsys, src, tmp_path / "dist", layouts["dp2mp4"])
    (dist / MANIFEST_NAME).unlink()  # as another tool writes it: nothing records the layout
    line = assert_refused(capsys, ["convert", "--src", dist, "--dst", tmp_path / "m"], tmp_path / "m", dist,
                          [str(dist)])  # fmt: skip
    assert "--src-layout" in line


def test_missing_source(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    code = main(["convert", "--src", str(missing), "--dst", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert code == 2
    assert str(missing) in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_missing_dst_option_is_a_usage_error(tmp_path, capsys, ckpt):
    src, _ = ckpt
    code = main(["convert", "--src", str(src)])
    _, err = capsys.readouterr()
    assert code == 2
    assert "--dst" in err


def test_bad_dtype(tmp_path, capsys, ckpt):
    src, _ = ckpt
    assert_refused(capsys, ["convert", "--src", src, "--dst", tmp_path / "out", "--dtype", "int8"],
                   tmp_path / "out", src.parent, ["int8"])  # fmt: skip


# ------------------------------------------------------------------------------------------------ end to end
# The one subprocess test: the README's quickstart command, with its own fake devices (no XLA_FLAGS given).


def test_end_to_end_quickstart_subprocess(tmp_path):
    config = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    config["workdir"] = str(tmp_path / "qs")
    config["layouts"] = [str((REPO_ROOT / layout).resolve()) for layout in config["layouts"]]
    for layout in config["layouts"]:
        assert Path(layout).is_file(), layout
    job = tmp_path / "quickstart.yaml"
    job.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxreshard", "--config", str(job)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bit for bit" in proc.stdout
    assert (tmp_path / "qs").is_dir()
