"""Corrupt and mismatched MindSpore inputs: exit 2, one clear line on stderr, no output, sources untouched.

Issue 3 ("Done when"): truncated ckpt, wrong strategy for the checkpoint, missing rank files, a strategy whose
stages are incomplete, an encrypted ckpt -> exit 2 with a clear message and no partial output. Issue 2: an
existing non-empty DST without --overwrite is refused and nothing is touched; sources are opened read-only.

Every test copies the fixtures it needs into tmp_path first (tests/fixtures is never touched) and runs the CLI
in process. Strategy variants are built here with the checked-in protobuf schema, not jaxreshard's writer.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxreshard.cli import main
from jaxreshard.formats.mindspore_ckpt import read_ckpt_index
from jaxreshard.formats.mindspore_strategy import ParallelStrategyMap

from .helpers import tree as outputs  # every file but the manifest, by relative path

FIX = Path(__file__).parent / "fixtures" / "mindspore"
PARAMS = ("embedding.embedding_table", "layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias",
          "norm.gamma", "adam_m.layer1.weight", "adam_v.layer1.weight")  # fmt: skip

# ------------------------------------------------------------------------------------------------ helpers


def sha_tree(root: Path) -> dict[str, str]:
    """sha256 of every file (and '' for every directory) under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
    return out


class Inputs:
    """tmp_path/in: copies of fixtures (and hand-made variants), hashed before the run and checked after."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "in"
        self.root.mkdir()

    def copy(self, rel: str, as_name: str | None = None) -> Path:
        src, dst = FIX / rel, self.root / (as_name or rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst

    def write(self, rel: str, data: bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


@pytest.fixture
def inputs(tmp_path) -> Inputs:
    return Inputs(tmp_path)


def run_fail(capsys, tmp_path: Path, inputs: Inputs, argv: list, *needles: str, pattern: str | None = None) -> str:
    """Run the CLI expecting exit 2; check the one-line message, no output, no partial siblings, same inputs."""
    before = sha_tree(inputs.root)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}, stderr:\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message, got:\n{err}"
    msg = lines[0]
    for needle in needles:
        assert needle in msg, f"{needle!r} not in message: {msg}"
    if pattern is not None:
        assert re.search(pattern, msg), f"{pattern!r} does not match message: {msg}"
    assert not (tmp_path / "out").exists(), "the destination was created"
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []
    assert sha_tree(inputs.root) == before, "a source or strategy file changed"
    return msg


def convert(src: Path, dst: Path, *extra) -> list:
    return ["convert", "--src", src, "--dst", dst, *extra, "-q"]




def edit_strategy(path: Path, edit) -> bytes:
    msg = ParallelStrategyMap()
    msg.ParseFromString(path.read_bytes())
    edit(msg)
    return msg.SerializeToString()


def layout_item(msg, name: str):
    return next(i for i in msg.parallel_layout_item if i.param_name == name).parallel_layouts


# ------------------------------------------------------------------------------------------------ corrupt ckpt


def _truncate_mid_record(path: Path) -> None:
    """Cut the file in the middle of layer1.weight's tensor bytes (a record, not a record boundary)."""
    entry = read_ckpt_index(path).tensors["layer1.weight"]
    offset, nbytes = entry.segments[0]
    data = path.read_bytes()
    path.write_bytes(data[: offset + nbytes // 2])


def _garbage(path: Path) -> None:
    rng = np.random.default_rng(7)
    data = bytearray(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data[0] = 0xFF  # never a protobuf record start (0x0a)
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _encrypted(path: Path) -> None:
    rng = np.random.default_rng(8)
    path.write_bytes((0x7F3A5ED8).to_bytes(4, "little") + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())


CORRUPTIONS = {"truncated": _truncate_mid_record, "garbage": _garbage, "empty": _empty, "encrypted": _encrypted}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_rank_file_of_a_distributed_source(tmp_path, capsys, inputs, kind):
    """dp2mp2 -> complete reads ranks 1 and 0; rank 1's file is damaged."""
    src = inputs.copy("ckpt/dp2mp2")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    CORRUPTIONS[kind](src / "rank_1" / "checkpoint_1.ckpt")
    needles = ("checkpoint_1.ckpt",) + (("encrypted",) if kind == "encrypted" else ())
    run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--src-strategy", strategy), *needles)


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_complete_source(tmp_path, capsys, inputs, kind):
    src = inputs.copy("ckpt/complete")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    CORRUPTIONS[kind](src / "rank_0" / "checkpoint_0.ckpt")
    needles = ("checkpoint_0.ckpt",) + (("encrypted",) if kind == "encrypted" else ())
    run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--dst-strategy", strategy), *needles)


def test_truncated_ckpt_names_the_parameter(tmp_path, capsys, inputs):
    src = inputs.copy("ckpt/complete")
    strategy = inputs.copy("strategy/mp4.ckpt")
    _truncate_mid_record(src / "rank_0" / "checkpoint_0.ckpt")
    run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--dst-strategy", strategy),
             "checkpoint_0.ckpt", "layer1.weight")  # fmt: skip


def test_encrypted_cbc_magic_too(tmp_path, capsys, inputs):
    src = inputs.copy("ckpt/complete")
    path = src / "rank_0" / "checkpoint_0.ckpt"
    path.write_bytes((0x7F3A5ED9).to_bytes(4, "little") + bytes(range(256)) * 8)
    run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out"), "checkpoint_0.ckpt", "encrypted")


# ------------------------------------------------------------------------------------------------ wrong strategy


# Note: ckpt/dp2mp2 read with strategy/mp4.ckpt is NOT detectable: every rank file holds same-shaped blocks, and
# mp4 simply implies a bigger full shape (embedding 128x16, layer1 16x64, ...), consistent across parameters.
# The wrong strategies below are the ones the files themselves contradict.


def test_pipeline_checkpoint_with_a_single_stage_strategy(tmp_path, capsys, inputs):
    """ckpt/dp1mp2pp2 read as dp2mp2: the strategy puts every parameter on every rank, but ranks 0-1 lack the
    stage-1 parameters and ranks 2-3 the stage-0 ones. Must be refused (naming a parameter missing from a rank
    file), not silently dropped from the output."""
    src = inputs.copy("ckpt/dp1mp2pp2")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    msg = run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--src-strategy", strategy))
    missing_on = {"layer2.weight": "rank_0", "layer2.bias": "rank_0", "norm.gamma": "rank_0",
                  "layer1.weight": "rank_2", "layer1.bias": "rank_2"}
    assert any(f"'{p}' is missing" in msg and r in msg for p, r in missing_on.items()), msg


def _mp3(msg):  # mp4 with every 4 in a dev_matrix made 3: 64 embedding rows do not split 3 ways
    for item in msg.parallel_layout_item:
        dims = item.parallel_layouts.dev_matrix[0].dim
        dims[:] = [3 if d == 4 else d for d in dims]


def test_destination_strategy_that_does_not_divide_the_shapes(tmp_path, capsys, inputs):
    bad = inputs.write("mp3.ckpt", edit_strategy(FIX / "strategy/mp4.ckpt", _mp3))
    src = inputs.copy("ckpt/complete")
    msg = run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--dst-strategy", bad))
    assert any(p in msg for p in PARAMS), f"no parameter named in: {msg}"


def _renamed(msg):  # a strategy for another model: no name matches the checkpoint
    for item in msg.parallel_layout_item:
        item.param_name = "other_model." + item.param_name


@pytest.mark.parametrize("side", ["src", "dst"])
def test_strategy_of_another_model(tmp_path, capsys, inputs, side):
    bad = inputs.write("other.ckpt", edit_strategy(FIX / "strategy/dp2mp2.ckpt", _renamed))
    src = inputs.copy("ckpt/dp2mp2" if side == "src" else "ckpt/complete")
    run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", f"--{side}-strategy", bad))


def test_dp2mp4_checkpoint_with_dp2mp2_strategy(tmp_path, capsys, inputs):
    """8 rank folders, a 4-device strategy: rank_4..rank_7 belong to no rank of the strategy, so the strategy is
    not the one this checkpoint was saved with (the blocks would be read as dp2mp2 and give a 32x16 embedding)."""
    src = inputs.copy("ckpt/dp2mp4")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    msg = run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--src-strategy", strategy))
    assert any(p in msg for p in PARAMS) or re.search(r"rank", msg), f"neither parameter nor rank named: {msg}"


def _longer_map(msg):  # layer1.bias is 1-D; give it a 2-entry tensor_map
    layout_item(msg, "layer1.bias").tensor_map[0].dim.append(-1)


def _shorter_map(msg):  # embedding.embedding_table is 2-D; give it a 1-entry tensor_map
    tmap = layout_item(msg, "embedding.embedding_table").tensor_map[0]
    del tmap.dim[1:]


@pytest.mark.parametrize("edit,param", [(_longer_map, "layer1.bias"), (_shorter_map, "embedding.embedding_table")],
                         ids=["longer", "shorter"])
@pytest.mark.parametrize("side", ["dst", "src"])
def test_tensor_map_rank_differs_from_tensor_rank(tmp_path, capsys, inputs, edit, param, side):
    bad = inputs.write("bad_dp2mp2.ckpt", edit_strategy(FIX / "strategy/dp2mp2.ckpt", edit))
    if side == "dst":
        src = inputs.copy("ckpt/complete")
        argv = convert(src, tmp_path / "out", "--dst-strategy", bad)
    else:
        src = inputs.copy("ckpt/dp2mp2")
        argv = convert(src, tmp_path / "out", "--src-strategy", bad)
    run_fail(capsys, tmp_path, inputs, argv, param)


# ------------------------------------------------------------------------------------------------ missing ranks


@pytest.mark.parametrize("how", ["folder", "file"])
def test_missing_rank_1(tmp_path, capsys, inputs, how):
    src = inputs.copy("ckpt/dp2mp2")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    if how == "folder":
        shutil.rmtree(src / "rank_1")
    else:
        (src / "rank_1" / "checkpoint_1.ckpt").unlink()
    run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--src-strategy", strategy),
             pattern=r"rank[ _]?1\b")  # fmt: skip


def test_missing_rank_needed_for_another_strategy(tmp_path, capsys, inputs):
    """dp2mp2 -> mp4 with ranks 0 and 1 gone: no replica of the mp=0 half is left anywhere."""
    src = inputs.copy("ckpt/dp2mp2")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    dst_strategy = inputs.copy("strategy/mp4.ckpt")
    shutil.rmtree(src / "rank_0")
    shutil.rmtree(src / "rank_1")  # no replica of the mp=0 half at all
    run_fail(capsys, tmp_path, inputs,
             convert(src, tmp_path / "out", "--src-strategy", strategy, "--dst-strategy", dst_strategy),
             pattern=r"rank[ _]?[01]\b")  # fmt: skip


def test_missing_replica_that_mindspore_does_not_need(tmp_path, capsys, inputs):
    """dp2mp2 -> complete: MindSpore reads ranks 1 and 0 only, so without rank_3 the result is the same."""
    src = inputs.copy("ckpt/dp2mp2")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    shutil.rmtree(src / "rank_3")
    before = sha_tree(inputs.root)
    dst = tmp_path / "out"
    code = main([str(a) for a in convert(src, dst, "--src-strategy", strategy)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert outputs(dst) == outputs(FIX / "ckpt/dp2mp2__to__complete")
    assert sha_tree(inputs.root) == before


# ------------------------------------------------------------------------------------------------ incomplete stages


def test_strategy_directory_with_only_stage_1(tmp_path, capsys, inputs):
    src = inputs.copy("ckpt/complete")
    stage_dir = inputs.copy("strategy/pp_stages/ckpt_strategy_rank_2.ckpt", "stage1_only/ckpt_strategy_rank_2.ckpt")
    msg = run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--dst-strategy", stage_dir.parent),
                   "stage1_only")  # fmt: skip
    assert "stage" in msg.replace("stage1_only", "")


def test_strategy_directory_with_only_stage_1_as_source(tmp_path, capsys, inputs):
    src = inputs.copy("ckpt/dp1mp2pp2")
    stage_dir = inputs.copy("strategy/pp_stages/ckpt_strategy_rank_2.ckpt", "stage1_only/ckpt_strategy_rank_2.ckpt")
    run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--src-strategy", stage_dir.parent),
             "stage1_only")  # fmt: skip


def _stages_0_and_2(msg):
    for item in msg.parallel_layout_item:
        if item.param_name.startswith("1-"):
            item.param_name = "2-" + item.param_name[2:]
    for item in msg.parallel_strategy_item:
        if item.parallel_strategys.stage == 1:
            item.parallel_strategys.stage = 2


def test_merged_strategy_with_stages_0_and_2(tmp_path, capsys, inputs):
    data = edit_strategy(FIX / "strategy/dp1mp2pp2.ckpt", _stages_0_and_2)
    assert b"2-layer2.weight" in data
    bad = inputs.write("stages02.ckpt", data)
    src = inputs.copy("ckpt/complete")
    msg = run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--dst-strategy", bad), "stages02.ckpt")
    assert "stage" in msg.replace("stages02", "")


def test_merged_strategy_with_stages_0_and_2_as_source(tmp_path, capsys, inputs):
    bad = inputs.write("stages02.ckpt", edit_strategy(FIX / "strategy/dp1mp2pp2.ckpt", _stages_0_and_2))
    src = inputs.copy("ckpt/dp1mp2pp2")
    run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--src-strategy", bad), "stages02.ckpt")


def test_strategy_directory_mixing_ckpt_and_json(tmp_path, capsys, inputs):
    src = inputs.copy("ckpt/dp1mp2pp2")
    mixed = inputs.copy("strategy/pp_stages", "mixed")
    inputs.copy("strategy/dp2mp2.json", "mixed/ckpt_strategy_rank_4.json")
    msg = run_fail(capsys, tmp_path, inputs, convert(src, tmp_path / "out", "--src-strategy", mixed), "mixed")
    assert "json" in msg.lower()


# ------------------------------------------------------------------------------------------------ usage


def test_src_layout_and_src_strategy_together(tmp_path, capsys, inputs):
    src = inputs.copy("ckpt/dp2mp2")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    layout = inputs.write("dp2mp2.yaml", b"mesh: {dp: 2, mp: 2}\nparams:\n  - {match: '.*', spec: []}\n")
    msg = run_fail(capsys, tmp_path, inputs,
                   convert(src, tmp_path / "out", "--src-layout", layout, "--src-strategy", strategy))
    assert "--src-layout" in msg and "--src-strategy" in msg


def test_dst_layout_and_dst_strategy_together(tmp_path, capsys, inputs):
    src = inputs.copy("ckpt/complete")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    layout = inputs.write("dp2mp2.yaml", b"mesh: {dp: 2, mp: 2}\nparams:\n  - {match: '.*', spec: []}\n")
    msg = run_fail(capsys, tmp_path, inputs,
                   convert(src, tmp_path / "out", "--dst-layout", layout, "--dst-strategy", strategy))
    assert "--dst-layout" in msg and "--dst-strategy" in msg


def test_existing_non_empty_dst_without_overwrite(tmp_path, capsys, inputs):
    src = inputs.copy("ckpt/complete")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    dst = tmp_path / "existing"
    (dst / "rank_0").mkdir(parents=True)
    (dst / "rank_0" / "checkpoint_0.ckpt").write_bytes(b"old output")
    (dst / "notes.txt").write_text("keep me")
    dst_before = sha_tree(dst)
    src_before = sha_tree(inputs.root)
    code = main([str(a) for a in convert(src, dst, "--dst-strategy", strategy)])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and str(dst.name) in err and "--overwrite" in err
    assert sha_tree(dst) == dst_before
    assert sha_tree(inputs.root) == src_before
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []


def test_existing_dst_with_overwrite_is_replaced(tmp_path, capsys, inputs):
    src = inputs.copy("ckpt/complete")
    strategy = inputs.copy("strategy/dp2mp2.ckpt")
    dst = tmp_path / "existing"
    (dst / "rank_9").mkdir(parents=True)
    (dst / "rank_9" / "stale.ckpt").write_bytes(b"old output")
    code = main([str(a) for a in convert(src, dst, "--dst-strategy", strategy, "--overwrite")])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert outputs(dst) == outputs(FIX / "ckpt/dp2mp2")
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []
