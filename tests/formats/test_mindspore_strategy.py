"""MindSpore strategy files: every reference file against manifest["layouts"], merging, JSON, writer round trips.

manifest["layouts"] encodes each parameter as [dev_matrix, tensor_map, opt_shard_step, opt_shard_size], a
multi-axis tensor-map entry as a list. `strategy/dp1mp2pp2.ckpt` was merged from `strategy/pp_stages/` by real
`merge_pipeline_strategys`, so an in-memory merge must reproduce its bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from jaxreshard.errors import FormatError
from jaxreshard.formats import mindspore_strategy as ms
from jaxreshard.formats import mindspore_strategy_write as msw
from jaxreshard.formats.mindspore_strategy import ParamStrategy, read_strategy

from ..wire import fields

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "mindspore"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
LAYOUTS = {k: v for k, v in MANIFEST["layouts"].items() if not k.startswith("dp1mp2pp2")}
STAGE_FILES = MANIFEST["layouts"]["dp1mp2pp2(stage files)"]
PP_DIR = ROOT / "strategy/pp_stages"
MERGED = ROOT / "strategy/dp1mp2pp2.ckpt"


def encode(p: ParamStrategy) -> list:
    return [list(p.dev_matrix), [list(e) if isinstance(e, tuple) else e for e in p.tensor_map],
            p.opt_shard_step, p.opt_shard_size]


def encode_all(params) -> dict:
    return {name: encode(p) for name, p in params.items()}


def layouts_only(data: bytes) -> bytes:
    """The serialized layout items of a strategy file (strategy items carry operator names we do not know)."""
    message = ms.ParallelStrategyMap()
    message.ParseFromString(data)
    del message.parallel_strategy_item[:]
    return message.SerializeToString()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_reference_layouts(name):
    strategy = read_strategy(ROOT / f"strategy/{name}.ckpt")
    assert encode_all(strategy.params) == LAYOUTS[name]
    assert list(strategy.params) == list(LAYOUTS[name])  # file order
    assert strategy.stage_num == 1 and strategy.file_stage == 0
    assert strategy.stage_device_num == (8 if name == "dp2mp4" else 4)
    assert all(p.stages == (0,) for p in strategy.params.values())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_writer_roundtrip_and_bytes(name, tmp_path):
    source = ROOT / f"strategy/{name}.ckpt"
    strategy = read_strategy(source)
    out = tmp_path / "s.ckpt"
    msw.write_strategy_file(out, strategy.params)
    assert read_strategy(out) == strategy
    assert layouts_only(out.read_bytes()) == layouts_only(source.read_bytes())  # filled like MindSpore's writer


def test_minus_one_is_a_ten_byte_varint(tmp_path):
    out = tmp_path / "s.ckpt"
    msw.write_strategy_file(out, {"w": ParamStrategy((4, 1), (-1, -1), 1, -1, (0,))})
    data = out.read_bytes()
    assert data.count(b"\xff" * 9 + b"\x01") == 3 and b"\x38\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01" in data


def test_multi_axis_maps_and_trailing_empty_tensor_map():
    strategy = read_strategy(ROOT / "strategy/dp2mp2_layout.ckpt")
    assert strategy.params["layer1.bias"].tensor_map == ((1, 0),)  # TensorMaps [1,0] and [] (1-D marker)
    assert strategy.params["embedding.embedding_table"].tensor_map == (-1, (1, 0))
    assert strategy.params["layer1.weight"].tensor_map == ((1, 0), -1)
    assert strategy.params["layer2.weight"].tensor_map == (1, 0)  # a plain single TensorMap
    message = ms.ParallelStrategyMap()
    message.ParseFromString((ROOT / "strategy/dp2mp2_layout.ckpt").read_bytes())
    bias = next(i for i in message.parallel_layout_item if i.param_name == "layer1.bias")
    assert [list(t.dim) for t in bias.parallel_layouts.tensor_map] == [[1, 0], []]


def test_stage_files_are_unmerged_single_stage():
    for rank, expected, stage in ((0, STAGE_FILES[0], 0), (2, STAGE_FILES[1], 1)):
        strategy = read_strategy(PP_DIR / f"ckpt_strategy_rank_{rank}.ckpt")
        assert encode_all(strategy.params) == expected
        assert strategy.file_stage == stage and strategy.stage_num == 1 and strategy.stage_device_num == 2


def test_merged_pipeline_file():
    strategy = read_strategy(MERGED)
    assert strategy.stage_num == 2 and strategy.stage_device_num == 2
    assert {n: p.stages for n, p in strategy.params.items()} == {
        "embedding.embedding_table": (0, 1), "layer1.weight": (0,), "layer1.bias": (0,),
        "adam_m.layer1.weight": (0,), "adam_v.layer1.weight": (0,), "layer2.weight": (1,), "layer2.bias": (1,),
        "norm.gamma": (1,)}  # fmt: skip
    for stage in (0, 1):
        assert encode_all(strategy.stage_params(stage)) == STAGE_FILES[stage]
        for name, expected in STAGE_FILES[stage].items():
            assert encode(strategy.layout_for_stage(name, stage)) == expected
    raw_names = [f"{s}-{n}" for s in (0, 1) for n in strategy.stage_params(s)]
    assert raw_names == MANIFEST["merged_pp_layout_names"]
    with pytest.raises(KeyError):
        strategy.layout_for_stage("layer2.weight", 0)


def test_directory_merge_equals_merged_file_and_reproduces_its_bytes():
    assert read_strategy(PP_DIR) == read_strategy(MERGED)
    kind, merged = ms.merge_pipeline_strategies(PP_DIR)
    assert kind == "proto" and merged.SerializeToString() == MERGED.read_bytes()


def test_merged_writer_roundtrip(tmp_path):
    strategy = read_strategy(MERGED)
    out = tmp_path / "m.ckpt"
    msw.write_merged_strategy_file(out, [strategy.stage_params(0), strategy.stage_params(1)])
    assert read_strategy(out) == strategy
    assert layouts_only(out.read_bytes()) == layouts_only(MERGED.read_bytes())
    per_stage = tmp_path / "dir"  # per-stage files written by us merge like MindSpore's
    per_stage.mkdir()
    for stage in (0, 1):
        msw.write_strategy_file(per_stage / f"ckpt_strategy_rank_{2 * stage}.ckpt", strategy.stage_params(stage), stage)
    assert read_strategy(per_stage) == strategy


def test_json_equals_protobuf():
    from_json = read_strategy(ROOT / "strategy/dp2mp2.json")
    from_proto = read_strategy(ROOT / "strategy/dp2mp2.ckpt")
    assert from_json == from_proto and encode_all(from_json.params) == LAYOUTS["dp2mp2"]


def test_json_directory_merge(tmp_path):
    doc = json.loads((ROOT / "strategy/dp2mp2.json").read_text())
    stage1 = json.loads(json.dumps(doc))
    for item in stage1["parallel_strategy_item"].values():
        item["stage"] = 1
    (tmp_path / "a_rank_0.json").write_text(json.dumps(doc))
    (tmp_path / "a_rank_1.json").write_text(json.dumps(doc))  # identical: skipped
    (tmp_path / "a_rank_4.json").write_text(json.dumps(stage1))
    strategy = read_strategy(tmp_path)
    assert strategy.stage_num == 2 and all(p.stages == (0, 1) for p in strategy.params.values())
    assert encode_all(strategy.stage_params(1)) == LAYOUTS["dp2mp2"]
    kind, merged = ms.merge_pipeline_strategies(tmp_path)
    assert kind == "json" and list(merged["parallel_layout_item"])[:2] == ["0-embedding.embedding_table",
                                                                            "0-layer1.weight"]


def _snapshot(directory: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


def test_directory_semantics_and_never_written(tmp_path):
    d = tmp_path / "strategies"
    d.mkdir()
    stage0 = PP_DIR / "ckpt_strategy_rank_0.ckpt"
    stage1 = PP_DIR / "ckpt_strategy_rank_2.ckpt"
    for rank in (0, 1):
        shutil.copy(stage0, d / f"ckpt_strategy_rank_{rank}.ckpt")  # byte-identical copies are skipped
    for rank in (2, 3):
        shutil.copy(stage1, d / f"ckpt_strategy_rank_{rank}.ckpt")
    other = {"embedding.embedding_table": ParamStrategy((2,), (-1, -1), 0, 0, (0,))}  # differs: loses to rank_2
    msw.write_strategy_file(d / "ckpt_strategy_rank_10.ckpt", other, stage=1)
    msw.write_strategy_file(d / "ckpt_strategy_rank_5.ckpt", other, stage=0)  # stage 0 again: loses to rank_0
    os.chmod(d, 0o555)  # read-only: any attempt to write there fails loudly
    try:
        before = _snapshot(d)
        assert read_strategy(d) == read_strategy(MERGED)
        assert _snapshot(d) == before
        assert _snapshot(PP_DIR) == _snapshot(PP_DIR)
    finally:
        os.chmod(d, 0o755)


def test_directory_errors(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(ROOT / "strategy/dp2mp2.ckpt", mixed)
    shutil.copy(ROOT / "strategy/dp2mp2.json", mixed)
    with pytest.raises(FormatError, match="mixes .ckpt and .json"):
        read_strategy(mixed)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="no strategy files"):
        read_strategy(empty)
    gap = tmp_path / "gap.ckpt"  # stages {0, 2}: stage 1's file is missing
    gap.write_bytes(msw.strategy_bytes({0: {"a": ParamStrategy((2,), (0,), 0, 0, ())},
                                       2: {"b": ParamStrategy((2,), (0,), 0, 0, ())}}, merged=True))
    with pytest.raises(FormatError, match=r"stages \[0, 2\]"):
        read_strategy(gap)


def test_shared_parameter_layout_choice(tmp_path):
    """`_convert_to_list`: without a rank the lowest stage's layout; with rank r (n devices per stage) stage 0's
    for r < n, else the last later-stage one. Written stage 1 first to check the choice does not depend on file
    order."""
    a, b = ParamStrategy((2, 2), (1, -1), 0, 0, ()), ParamStrategy((2, 2), (0, -1), 0, 0, ())
    path = tmp_path / "shared.ckpt"
    path.write_bytes(msw.strategy_bytes({1: {"e": b, "x": b}, 0: {"e": a}}, merged=True))
    strategy = read_strategy(path)
    assert strategy.params["e"].tensor_map == (1, -1) and strategy.params["e"].stages == (0, 1)
    assert strategy.stage_device_num == 4 and strategy.stage_num == 2
    assert strategy.layout_for_rank("e", 0).tensor_map == (1, -1)
    assert strategy.layout_for_rank("e", 5).tensor_map == (0, -1)  # stage 1's entry came first and stays
    path.write_bytes(msw.strategy_bytes({0: {"e": a}, 1: {"e": b}}, merged=True))
    strategy = read_strategy(path)
    assert strategy.layout_for_rank("e", 3).tensor_map == (1, -1)
    assert strategy.layout_for_rank("e", 4).tensor_map == (0, -1)
    assert strategy.layout_for_stage("e", 1).tensor_map == (0, -1)


def test_bad_files(tmp_path):
    cases = {
        "empty.ckpt": b"",
        "garbage.ckpt": bytes(range(256)),
        "truncated.ckpt": MERGED.read_bytes()[:400],
        "nolayouts.ckpt": msw.strategy_bytes({0: {}}, merged=False),
        "pp_only.ckpt": msw.strategy_bytes({0: {"w": ParamStrategy((), (), 0, 0, ())}}, merged=False),
        "dash.ckpt": msw.strategy_bytes({0: {"my-param": ParamStrategy((2,), (0,), 0, 0, ())}}, merged=False),
        "bad.json": b"{not json",
    }
    messages = {"empty.ckpt": "empty", "garbage.ckpt": "not a MindSpore strategy", "truncated.ckpt": "strategy",
                "nolayouts.ckpt": "no parameter layouts", "pp_only.ckpt": "only contains pipeline-parallelism",
                "dash.ckpt": "'my-param'", "bad.json": "JSON"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError, match=messages[name]) as info:
            read_strategy(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(FormatError):
        read_strategy(tmp_path / "missing.ckpt")


def test_inconsistent_probe_strategies():
    """The replica-probe strategies as decoded independently from their wire bytes."""
    expected = {
        "src_dp2mp2": {"w": [[2, 2], [-1, 0], 0, 0], "v": [[2, 1, 2], [1, 0], 0, 0]},
        "dst_mp4": {"w": [[4], [-1, 0], 0, 0], "v": [[1, 4], [0, -1], 0, 0]},
        "dst_dp4": {"w": [[4, 1], [-1, -1], 0, 0], "v": [[4, 1], [-1, -1], 0, 0]},
        "dst_mp2_2dev": {"w": [[2], [0, -1], 0, 0], "v": [[2], [-1, 0], 0, 0]},
        "dst_dp4mp2_8dev": {"w": [[4, 2], [0, -1], 0, 0], "v": [[4, 2], [-1, 0], 0, 0]},
        "dst_opt": {"w": [[2, 2], [-1, 0], 2, 2], "v": [[2, 1, 2], [1, 0], 2, 2]},
    }
    for name, layouts in expected.items():
        assert encode_all(read_strategy(ROOT / f"inconsistent/{name}.ckpt").params) == layouts
        assert _wire_layouts((ROOT / f"inconsistent/{name}.ckpt").read_bytes()) == layouts


def _wire_layouts(data: bytes) -> dict:
    """A minimal wire-format decoder (no protobuf runtime) for single-TensorMap strategy files."""

    def signed(v: int) -> int:
        return v - (1 << 64) if v >= 1 << 63 else v

    out = {}
    for number, item in fields(data):
        if number != 3:
            continue
        name, layouts = [v for _, v in fields(item)]
        values = {}
        for f, v in fields(layouts):
            values.setdefault(f, []).append(v)
        dev = [d for _, d in fields(values[1][0])]
        tmap = [signed(d) for _, d in fields(values[2][0])]
        out[name.decode()] = [dev, tmap, signed(values[6][0]), signed(values[7][0])]
    return out
