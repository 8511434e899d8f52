"""Planning per layout, not per tensor x rank: the groups, the shared per-rank tuples, and a 2000-tensor x
256-rank plan whose box and cover computations are counted (a regression to per-(tensor, rank) planning multiplies
them by hundreds; no timing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxreshard import paramsources
from jaxreshard.box import Box
from jaxreshard.formats.base import TensorEntry
from jaxreshard.layout import ParamLayout, layout_from_dict
from jaxreshard.plan import make_plan
from jaxreshard.planstats import plan_stats
from jaxreshard.rankgroups import layout_groups, per_rank

F32 = np.dtype(np.float32)
MP2 = ParamLayout((("dp", 2), ("mp", 2)), (("mp",), ()), (0, 1))  # 2 stages x (dp 2 x mp 2): 8 ranks


def test_groups_compute_each_layouts_boxes_once_and_only_for_wanted_ranks():
    items = [((8, 4), MP2), ((8, 4), MP2), ((4,), MP2), ((8, 4), MP2)]
    groups, group_of = layout_groups(items, wanted=[0, 1, 5])
    assert group_of == [0, 0, 1, 0]
    rows = groups[0]
    # local ranks 0 (dp0 mp0), 1 (dp0 mp1) and 1 again (rank 5 = stage 1, local 1): two distinct boxes
    assert rows.boxes == (Box((0, 0), (4, 4)), Box((4, 0), (8, 4)))
    assert rows.index == (0, 1, -1, -1)  # local ranks 2 and 3 are held by no wanted rank
    assert [rows.pick(r) for r in (0, 1, 5, 4)] == [0, 1, 1, 0]
    assert groups[1].boxes == (Box((0,), (2,)), Box((2,), (4,)))  # its own group: same layout, another shape
    other_stage = ParamLayout(MP2.mesh_axes, MP2.spec, (1,))
    (late,), _ = layout_groups([((8, 4), other_stage)], wanted=[0, 1])
    assert late.boxes == () and late.pick(0) == -1  # stage 1 only: the wanted ranks of stage 0 hold nothing


def test_per_rank_picks_in_item_order_and_shares_tuples_between_equal_ranks():
    items = [((8, 4), MP2), ((2,), ParamLayout(MP2.mesh_axes, (), (1,))), ((8, 4), MP2)]
    groups, group_of = layout_groups(items, wanted=range(8))
    tables = [[f"{name}@{k}" for k in range(len(groups[g].boxes))] for name, g in zip("xyz", group_of)]
    ranks = dict(per_rank(groups, group_of, tables, list(range(8))))
    assert ranks[0] == ("x@0", "z@0") and ranks[1] == ("x@1", "z@1")
    assert ranks[5] == ("x@1", "y@0", "z@1")  # stage 1 also holds y
    assert ranks[2] is ranks[0] and ranks[7] is ranks[5]  # data-parallel replicas: one tuple object
    assert ranks[4] is not ranks[0]


def _entry(param: str, shape: tuple[int, ...]) -> TensorEntry:
    return TensorEntry(param, F32, shape, Path(f"/fake/part_{int(param.split('.')[1]) % 3}.st"), ((0, 0),))


def test_2000_tensors_on_256_ranks_cost_one_box_per_layout_and_local_rank(monkeypatch):
    layers = 1000
    names = [f"layers.{i}.{kind}" for i in range(layers) for kind in ("w", "b")]
    entries = {0: {n: _entry(n, (64, 32) if n.endswith("w") else (32,)) for n in names}}
    layout = layout_from_dict({"mesh": {"dp": 16, "mp": 16}, "params": [
        {"match": r"layers\.\d+\.w", "spec": ["mp", None]}, {"match": ".*", "spec": []}]})
    boxes, covers = [], []
    real_box, real_cover = ParamLayout.box, paramsources.cover
    monkeypatch.setattr(ParamLayout, "box", lambda self, shape, local: boxes.append(1) or real_box(self, shape, local))
    monkeypatch.setattr(paramsources, "cover", lambda grid, box: covers.append(box) or real_cover(grid, box))

    plan = make_plan(entries, None, layout)

    assert len(plan.ranks) == 256 and all(len(r.shards) == 2 * layers for r in plan.ranks)
    # per layout group: one box per local rank (2 groups x 256), not per tensor x rank (2000 x 256 = 512000)
    assert len(boxes) <= 2 * 256
    # one cover per (source grid, distinct box): 16 row blocks of the weights + the whole bias
    assert len(covers) == 17
    for rank in (0, 17, 255):
        w = plan.ranks[rank].shards[2 * 7]
        assert w.param == "layers.7.w" and w.dst_box == Box((4 * (rank % 16), 0), (4 * (rank % 16) + 4, 32))
        assert w.reads[0].src_rank == 0 and w.reads[0].region == w.dst_box
    assert plan.ranks[3].shards is plan.ranks[3 + 16 * 9].shards  # same mp coordinate: one shared tuple
    distinct = {id(s) for r in plan.ranks for s in r.shards}
    assert len(distinct) == layers * 16 + layers  # one ShardPlan per (tensor, distinct box)
    stats = plan_stats(plan)
    per_rank_bytes = layers * (4 * 32 + 32) * 4
    assert {r.write_bytes for r in stats.ranks} == {per_rank_bytes} and stats.write_bytes == 256 * per_rank_bytes
    assert stats.read_bytes == layers * (64 * 32 + 32) * 4  # each distinct box read once
    assert stats.ranks[5].src_files == ("/fake/part_0.st", "/fake/part_1.st", "/fake/part_2.st")
