"""Wrong or hostile strategy values are refused naming the file and parameter (protobuf, JSON, folders)."""

import json
import math
import time
from pathlib import Path

import pytest

from jaxreshard.caps import MAX_RANKS
from jaxreshard.errors import FormatError
from jaxreshard.formats.mindspore_strategy import ParallelStrategyMap, read_strategy

FIX = Path(__file__).parents[1] / "fixtures" / "mindspore" / "strategy"


def proto_with(tmp_path: Path, edit, name: str = "s.ckpt", base: str = "dp2mp2.ckpt") -> Path:
    msg = ParallelStrategyMap()
    msg.ParseFromString((FIX / base).read_bytes())
    edit({i.param_name: i.parallel_layouts for i in msg.parallel_layout_item})
    path = tmp_path / name
    path.write_bytes(msg.SerializeToString())
    return path


def json_with(tmp_path: Path, edit, name: str = "s.json") -> Path:
    doc = json.loads((FIX / "dp2mp2.json").read_text())
    edit(doc["parallel_layout_item"])
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def set_dims(field, values):
    del field.dim[:]
    field.dim.extend(values)


def test_fixtures_are_valid_and_consistent():
    for path in sorted(FIX.glob("*.ckpt")) + [FIX / "dp2mp2.json", FIX / "pp_stages"]:
        strategy = read_strategy(path)
        counts = {math.prod(p.dev_matrix) for e in strategy.entries.values() for _, p in e}
        assert counts == {strategy.stage_device_num}, path


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda L: set_dims(L["layer1.bias"].dev_matrix[0], [2, 0]), r"'layer1.bias': dev_matrix \[2, 0\] holds 0"),
        (lambda L: set_dims(L["layer1.bias"].dev_matrix[0], [4, 4]),
         r"'layer1.bias' \(stage 0\) is laid out on 16 devices but 'embedding.embedding_table' on 4"),
        (lambda L: set_dims(L["layer1.bias"].dev_matrix[0], [2**20]), rf"over {MAX_RANKS} devices"),
        (lambda L: set_dims(L["layer1.bias"].dev_matrix[0], [2] * 40), r"40 entries, over the cap of 32"),
        (lambda L: set_dims(L["layer1.bias"].tensor_map[0], [5]), r"'layer1.bias': tensor_map \[5\] holds 5; .* 0..1"),
        (lambda L: set_dims(L["layer1.bias"].tensor_map[0], [-2]), r"holds -2"),
        (lambda L: set_dims(L["embedding.embedding_table"].tensor_map[0], [0, 0]), r"uses device axis 0 twice"),
        (lambda L: setattr(L["layer1.bias"], "opt_weight_shard_size", -5), r"opt_weight_shard_size -5"),
        (lambda L: setattr(L["layer1.bias"], "opt_weight_shard_size", 9), r"opt_weight_shard_size 9 must be"),
        (lambda L: setattr(L["layer1.bias"], "opt_weight_shard_step", -1), r"opt_weight_shard_step -1"),
    ],
)
def test_refused_protobuf_values(tmp_path, edit, pattern):
    path = proto_with(tmp_path, edit)
    with pytest.raises(FormatError, match=pattern) as info:
        read_strategy(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda L: L["layer1.bias"].update(dev_matrix=[2, 0]), r"holds 0"),
        (lambda L: L["layer1.bias"].update(dev_matrix=[2, 2.0]), r"holds 2.0"),
        (lambda L: L["layer1.bias"].update(dev_matrix=[2, 1.5]), r"holds 1.5"),
        (lambda L: L["layer1.bias"].update(dev_matrix=[2, "2"]), r"holds '2'"),
        (lambda L: L["layer1.bias"].update(dev_matrix=[2, True]), r"holds True"),
        (lambda L: L["layer1.bias"].update(dev_matrix="22"), r"malformed JSON layout"),
        (lambda L: L["layer1.bias"].update(dev_matrix=[8, 2]), r"on 16 devices but 'embedding.embedding_table' on 4"),
        (lambda L: L["layer1.bias"].update(tensor_map=[0.0]), r"tensor_map \[0.0\] holds 0.0"),
        (lambda L: L["layer1.bias"].update(tensor_map=[[0, 0]]), r"uses device axis 0 twice"),
        (lambda L: L["layer1.bias"].update(tensor_map=[[]]), r"empty entry"),
        (lambda L: L["layer1.bias"].update(opt_weight_shard_step="1"), r"opt_weight_shard_step '1'"),
    ],
)
def test_refused_json_values(tmp_path, edit, pattern):
    with pytest.raises(FormatError, match=pattern):
        read_strategy(json_with(tmp_path, edit))


def test_stage_names_and_items_checked(tmp_path):
    msg = ParallelStrategyMap()
    msg.ParseFromString((FIX / "dp2mp2.ckpt").read_bytes())
    msg.parallel_layout_item[0].param_name = "99999999999999999999-" + msg.parallel_layout_item[0].param_name
    (tmp_path / "big.ckpt").write_bytes(msg.SerializeToString())
    with pytest.raises(FormatError, match=r"stage '99999999999999999999' is not a small non-negative integer"):
        read_strategy(tmp_path / "big.ckpt")
    doc = json.loads((FIX / "dp2mp2.json").read_text())
    next(iter(doc["parallel_strategy_item"].values()))["stage"] = 0.5
    (tmp_path / "s.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"stage 0.5 must be an integer"):
        read_strategy(tmp_path / "s.json")


def test_huge_device_count_refused_fast(tmp_path):
    path = proto_with(tmp_path, lambda L: [set_dims(x.dev_matrix[0], [1024, 1024]) for x in L.values()])
    start = time.monotonic()
    with pytest.raises(FormatError, match=rf"over {MAX_RANKS} devices"):
        read_strategy(path)
    assert time.monotonic() - start < 1


def test_deep_json_and_special_files(tmp_path):
    import os

    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(FormatError, match="nested too deeply"):
        read_strategy(tmp_path / "deep.json")
    os.mkfifo(tmp_path / "fifo.ckpt")
    with pytest.raises(FormatError, match="not a regular file"):
        read_strategy(tmp_path / "fifo.ckpt")
    (tmp_path / "bad.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(FormatError, match="cannot read the JSON strategy file"):
        read_strategy(tmp_path / "bad.json")


def test_folder_with_inconsistent_stage_files(tmp_path):
    """A pipeline folder whose stage-1 file is from a 16-device job: refused naming both device counts."""
    folder = tmp_path / "pp"
    folder.mkdir()
    (folder / "ckpt_strategy_rank_0.ckpt").write_bytes((FIX / "pp_stages" / "ckpt_strategy_rank_0.ckpt").read_bytes())
    msg = ParallelStrategyMap()
    msg.ParseFromString((FIX / "pp_stages" / "ckpt_strategy_rank_2.ckpt").read_bytes())
    for item in msg.parallel_layout_item:
        dims = list(item.parallel_layouts.dev_matrix[0].dim)
        set_dims(item.parallel_layouts.dev_matrix[0], [dims[0] * 4, *dims[1:]])
    (folder / "ckpt_strategy_rank_2.ckpt").write_bytes(msg.SerializeToString())
    with pytest.raises(FormatError, match=r"\(stage 1\) is laid out on 8 devices but .* on 2"):
        read_strategy(folder)


def test_non_utf8_parameter_name(tmp_path):
    data = (FIX / "dp2mp2.ckpt").read_bytes()
    at = data.find(b"layer1.bias")
    (tmp_path / "s.ckpt").write_bytes(data[:at] + b"\xff" + data[at + 1:])
    with pytest.raises(FormatError, match=r"parameter name b'\\xffayer1.bias' is not UTF-8"):
        read_strategy(tmp_path / "s.ckpt")
