"""The native and restore planners' two sinks: rank files (`plan`) and in-memory arrays (`plan_arrays`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxreshard.box import Box
from jaxreshard.formats import open_source
from jaxreshard.plan import BoxReads, Cast, PerRankCopy, Restore, TextRecord
from jaxreshard.planners import ArrayRequest, FileRequest, NativePlanner, read_side

REPO = Path(__file__).parents[2]
FIX = REPO / "tests" / "fixtures" / "mindspore"
LAYOUT = REPO / "configs" / "layouts" / "llama_dp2mp4.yaml"


def test_plan_arrays_reads_only_the_requested_boxes(llama):
    planner = NativePlanner(open_source(llama), None)
    name = "model.layers.0.self_attn.q_proj.weight"
    shape, dtype = planner.full_shape(name)
    boxes = [Box((0, 0), (shape[0] // 2, shape[1])), Box((0, 0), (shape[0] // 2, shape[1]))]  # a replica twice
    plan = planner.plan_arrays({"q": ArrayRequest(name, boxes, np.dtype(np.float32))})
    (rank,) = plan.ranks
    assert rank.dst_file == "" and [s.dst_box for s in rank.shards] == [boxes[0]]  # read once
    info = plan.params["q"]
    assert info.param == name and info.shape == shape and isinstance(info.source, BoxReads)
    assert info.transforms == (Cast(np.dtype(np.float32)),) and info.dst_dtype == np.float32
    assert plan.src_entries[0]["q"] == open_source(llama).entries[0][name]  # keyed by the destination name


def test_native_plan_carries_text_records_to_every_rank():
    source = open_source(FIX / "ckpt" / "complete")
    texts = source.extras.get(0, {})
    plan = NativePlanner(source, None, read_side(LAYOUT)).plan(FileRequest("c_", ".ckpt", [1, 3]))
    assert [r.dst_file for r in plan.ranks] == ["rank_1/c_1.ckpt", "rank_3/c_3.ckpt"]
    assert all(r.texts == tuple(TextRecord(k, v) for k, v in texts.items()) for r in plan.ranks)


def test_mindspore_pass_through_copies_are_typed():
    from jaxreshard.planners import MindSporePlanner

    source = open_source(FIX / "ckpt" / "dp2mp4")
    src, dst = read_side(FIX / "strategy" / "dp2mp4.ckpt"), read_side(FIX / "strategy" / "mp4.ckpt")
    plan = MindSporePlanner(source, src, dst).plan(FileRequest(suffix=".ckpt"))
    copied = {p for p, i in plan.params.items() if isinstance(i.source, PerRankCopy)}
    assert copied == {"global_step", "learning_rate"}
    assert all(isinstance(i.source, BoxReads) for p, i in plan.params.items() if p not in copied)
    assert not any(isinstance(i.source, Restore) for i in plan.params.values())
