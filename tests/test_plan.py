"""Planning without devices or files: fake index entries, exact expected boxes and byte counts."""

from pathlib import Path

import numpy as np
import pytest

from jaxreshard.box import Box
from jaxreshard.coverage import ReadItem, check_exact_cover
from jaxreshard.errors import LayoutError, PlanError
from jaxreshard.formats.base import TensorEntry
from jaxreshard.layout import layout_from_dict
from jaxreshard.plan import format_ranks, make_plan, merge_orders, with_dtype
from jaxreshard.planstats import plan_stats

F32 = np.dtype(np.float32)


def entry(param, shape, rank=0, dtype=F32):
    return TensorEntry(param, np.dtype(dtype), tuple(shape), Path(f"/fake/rank_{rank}.st"), ((0, 0),))


def complete(**shapes):
    return {0: {p: entry(p, s) for p, s in shapes.items()}}


MP4 = layout_from_dict({"mesh": {"mp": 4}, "params": [{"match": "w", "spec": ["mp", None]}]})
DP2MP2 = layout_from_dict({"mesh": {"dp": 2, "mp": 2}, "params": [{"match": "w", "spec": [None, "mp"]}]})


def test_split_complete_rows():
    plan = make_plan(complete(w=(8, 6), s=()), None, MP4)
    assert [r.dst_file for r in plan.ranks] == [f"rank_{r}/checkpoint_{r}.safetensors" for r in range(4)]
    shard = plan.ranks[2].shards[0]
    assert shard.param == "w" and shard.dst_box == Box((4, 0), (6, 6))
    assert shard.reads == (ReadItem(0, Box((4, 0), (6, 6)), Box((0, 0), (8, 6))),)
    scalar = plan.ranks[3].shards[1]
    assert scalar.param == "s" and scalar.dst_box == Box((), ())


def test_reshard_rows_to_columns_reads_every_row_block():
    src = {r: {"w": entry("w", (2, 6), r)} for r in range(4)}
    plan = make_plan(src, MP4, DP2MP2)
    # dst rank 3 = (dp 1, mp 1): columns 3:6, all rows -> one region from each of the 4 source row blocks
    shard = plan.ranks[3].shards[0]
    assert shard.dst_box == Box((0, 3), (8, 6))
    assert [(r.src_rank, r.region) for r in shard.reads] == [
        (k, Box((2 * k, 3), (2 * k + 2, 6))) for k in range(4)
    ]
    # dp replicas share one ShardPlan object (read once)
    assert plan.ranks[1].shards[0] is shard


def test_merge_to_complete_and_stats():
    src = {r: {"w": entry("w", (2, 6), r), "b": entry("b", (3,), r, np.int8)} for r in range(4)}
    plan = make_plan(src, MP4, None)
    assert len(plan.ranks) == 1
    stats = plan_stats(plan)
    (rank,) = stats.ranks
    assert rank.read_bytes == 8 * 6 * 4 + 3 and rank.write_bytes == 8 * 6 * 4 + 3
    assert rank.src_files == ("/fake/rank_0.st", "/fake/rank_1.st", "/fake/rank_2.st", "/fake/rank_3.st")
    assert stats.peak_param == "w" and stats.peak_buffer_bytes == 192


def test_stats_count_replicas_once():
    plan = make_plan(complete(w=(8, 6)), None, DP2MP2)
    stats = plan_stats(plan)
    assert [r.write_bytes for r in stats.ranks] == [96] * 4
    assert stats.write_bytes == 384
    assert stats.read_bytes == 192  # two distinct column blocks, each read once for both dp replicas
    assert stats.peak_buffer_bytes == 192


def test_cast_only_floats():
    plan = with_dtype(make_plan({0: {"w": entry("w", (4,)), "i": entry("i", (4,), dtype=np.int32)}}, None, None),
                      np.dtype(np.float16))
    assert plan.params["w"].dst_dtype == np.float16 and plan.params["i"].dst_dtype == np.int32
    assert plan_stats(plan).peak_buffer_bytes == 16 + 8  # f32 source buffer + its f16 cast


def test_pipeline_ranks_hold_only_their_stage():
    layout = layout_from_dict({"mesh": {"mp": 2}, "pipeline_stages": 2, "params": [
        {"match": r"l\.(\d+)", "spec": ["mp"], "stage": "by_layer"},
        {"match": "step", "spec": []}]})
    plan = make_plan({0: {"l.0": entry("l.0", (4,)), "l.1": entry("l.1", (4,)), "step": entry("step", ())}},
                     None, layout)
    # no stage = stage 0
    assert [[s.param for s in r.shards] for r in plan.ranks] == [["l.0", "step"], ["l.0", "step"], ["l.1"], ["l.1"]]


def test_dst_ranks_subset_and_bad_rank():
    plan = make_plan(complete(w=(8, 6)), None, MP4, dst_ranks=[3, 1])
    assert [r.dst_rank for r in plan.ranks] == [1, 3]
    with pytest.raises(PlanError, match=r"ranks \[4\] do not exist"):
        make_plan(complete(w=(8, 6)), None, MP4, dst_ranks=[4])


def test_indivisible_split_names_param():
    with pytest.raises(LayoutError, match="'w' dim 0 of size 6 cannot be split 4 ways"):
        make_plan(complete(w=(6, 2)), None, MP4)


def test_missing_source_rank_named():
    src = {r: {"w": entry("w", (2, 6), r)} for r in (0, 1, 3)}
    with pytest.raises(PlanError, match=r"rank folders 2 are missing"):
        make_plan(src, MP4, None)
    # converting only some destination ranks: an error only when a missing rank is actually needed
    with pytest.raises(PlanError, match=r"missing source ranks \[2\]"):
        make_plan(src, MP4, MP4, dst_ranks=[2])
    assert make_plan(src, MP4, MP4, dst_ranks=[3]).ranks[0].shards[0].reads[0].src_rank == 3


def test_missing_dp_replica_is_an_error_unless_converting_some_ranks():
    src = {r: {"w": entry("w", (8, 3), r)} for r in (0, 1)}  # ranks 2, 3 are dp copies
    with pytest.raises(PlanError, match="rank folders 2-3 are missing"):
        make_plan(src, DP2MP2, None)
    plan = make_plan(src, DP2MP2, DP2MP2, dst_ranks=[0, 1, 2, 3])
    assert {r.src_rank for r in plan.ranks[3].shards[0].reads} == {1}


def test_param_missing_on_a_holder_rank():
    src = {r: {"w": entry("w", (8, 3), r), "s": entry("s", (), r)} for r in range(4)}
    del src[2]["s"]
    with pytest.raises(PlanError, match="'s' is missing on source rank 2"):
        make_plan(src, DP2MP2, None)


def test_format_ranks():
    assert format_ranks([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_ranks([]) == ""


def test_extra_source_ranks_rejected():
    src = {r: {"w": entry("w", (2, 6), r)} for r in range(8)}
    with pytest.raises(PlanError, match="only 4 ranks"):
        make_plan(src, MP4, None)


def test_inconsistent_source_shapes():
    src = {r: {"w": entry("w", (2, 6), r)} for r in range(4)}
    src[2]["w"] = entry("w", (2, 5), 2)
    with pytest.raises(Exception, match=r"rank 2 is float32\[2, 5\]"):
        make_plan(src, MP4, None)


def test_exact_cover_check():
    box = Box((0, 0), (4, 4))
    check_exact_cover("p", box, [Box((0, 0), (2, 4)), Box((2, 0), (4, 4))])
    with pytest.raises(PlanError, match="overlap"):
        check_exact_cover("p", box, [Box((0, 0), (3, 4)), Box((2, 0), (4, 4))])
    with pytest.raises(PlanError, match="cover 8 of 16"):
        check_exact_cover("p", box, [Box((0, 0), (2, 4))])
    with pytest.raises(PlanError, match="outside"):
        check_exact_cover("p", box, [Box((0, 0), (5, 4))])


def test_merge_orders_restores_original():
    original = ["embed", "l0", "l1", "l2", "l3", "norm", "head", "step"]
    stage0 = ["embed", "l0", "l1", "step"]
    stage1 = ["l2", "l3", "norm", "head", "step"]
    assert merge_orders([stage0, stage0, stage1, stage1]) == original
    assert merge_orders([["a", "b"], ["b", "a"]]) == ["a", "b"]  # inconsistent: first appearance
