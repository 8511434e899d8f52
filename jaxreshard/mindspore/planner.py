"""`mindspore.transform_checkpoints`, exactly: which parameters each rank file gets, in which order, from where.

The data movement itself is the ordinary plan (MindSpore's transform is a pure reslicing); what
this module adds is MindSpore's orchestration, so that output files are byte-identical (tests/test_mindspore_parity.py):
- path choice: the by-stage path (`{prefix}{rank}_part{stage}`) when one pipeline-stage strategy file is
  converted into a larger strategy, else the all-stages path;
- per destination rank, parameters are first-seen in the files of the source stages it loads, read in
  descending rank order; parameters of other pipeline stages (on both sides) are dropped;
- parameters in both strategies are transformed; all others (step counters, names missing from one side)
  are copied verbatim from local source rank `rank % devices` (lowest global rank wins); transformed ones
  come first, then the copies;
- with `exact_replicas`, every block is read from the data-parallel replica MindSpore would use,
  which matters only for sources whose replicas differ; by default each block is read once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from ..box import Box
from ..coverage import Cell, ReadItem, SourceGrid, cover, lowest_rank, source_grid
from ..errors import PlanError
from ..formats import SourceCheckpoint
from ..formats.mindspore_ckpt import OPTIMIZER_PREFIXES
from ..formats.mindspore_strategy import Strategy
from ..layout import COMPLETE, ParamLayout, unravel
from ..plan import COPY, ParamInfo, PerRankCopy, Plan, RankPlan, ShardPlan, TextRecord, dst_rank_list, full_shape
from .ranklist import rank_list_for_transform
from .strategy import param_layout


def uses_by_stage_path(src: Strategy | None, dst: Strategy | None) -> bool:
    """`transform_checkpoints`' choice: both single-stage, source keys a strict subset of destination keys."""
    if src is None or dst is None or src.stage_num != 1 or dst.stage_num != 1:
        return False
    src_keys = {k for k in src.params if not k.startswith(OPTIMIZER_PREFIXES)}
    dst_keys = {k for k in dst.params if not k.startswith(OPTIMIZER_PREFIXES)}
    return src_keys < dst_keys


def plan_mindspore(
    source: SourceCheckpoint,
    src: Strategy | None,
    dst: Strategy | None,
    *,
    prefix: str = "checkpoint_",
    suffix: str = ".ckpt",
    dst_ranks: Iterable[int] | None = None,
    exact_replicas: bool = False,
) -> Plan:
    """Plan a conversion with `transform_checkpoints` semantics (see the module docstring)."""
    if src is None and source.distributed:
        raise PlanError(f"{source.path}: a distributed source needs its strategy (--src-strategy)")
    if src is not None and not uses_by_stage_path(src, dst):  # by stage: the other stages' folders are expected
        total = src.stage_device_num * src.stage_num
        extra = sorted(r for r in source.entries if r >= total)
        if extra:
            raise PlanError(
                f"{source.path}: rank folders {extra} lie beyond the {total} ranks of the source strategy "
                f"{src.source}; is it the strategy this checkpoint was saved with?"
            )
    planner = _Planner(source, src, dst, exact_replicas)
    if uses_by_stage_path(src, dst):
        n_dst = dst.stage_device_num  # type: ignore[union-attr]
        wanted = dst_rank_list(dst_ranks, n_dst, "strategy")
        ranks = [planner.by_stage_rank(r, prefix, suffix) for r in wanted]
    else:
        n_dst = dst.stage_device_num * dst.stage_num if dst else 1
        wanted = dst_rank_list(dst_ranks, n_dst, "strategy")
        ranks = [planner.all_stages_rank(r, f"rank_{r}/{prefix}{r}{suffix}") for r in wanted]
    return Plan(planner.infos, tuple(ranks), source.entries)


class _Planner:
    def __init__(self, source: SourceCheckpoint, src: Strategy | None, dst: Strategy | None, exact: bool):
        self.source, self.src, self.dst, self.exact = source, src, dst, exact
        self.n_src = src.stage_device_num if src else 1
        self.n_dst = dst.stage_device_num if dst else 1
        self.infos: dict[str, ParamInfo] = {}
        self._grids: dict[str, SourceGrid] = {}
        self._covers: dict[tuple, ShardPlan] = {}

    # -- which names a destination rank gets, in MindSpore's order ------------------------------------------

    def _names(self, load_ranks: list[int], dst_rank: int) -> list[str]:
        order: dict[str, None] = {}
        for rank in load_ranks:
            if rank not in self.source.orders:
                raise PlanError(
                    f"{self.source.path}: the checkpoint file of rank {rank} (folder rank_{rank}) is needed for "
                    f"converting rank {dst_rank}'s checkpoint, but it is missing"
                )
            for name in self.source.orders[rank]:
                order.setdefault(name)
        return list(order)

    def all_stages_rank(self, rank: int, dst_file: str) -> RankPlan:
        local = rank % self.n_dst
        stage = rank // self.n_dst
        dst_map = self._dst_map(rank, stage)
        src_map = dict(self.src.params) if self.src else None
        if src_map is not None and self.dst is not None:
            for name in self.dst.params:
                if name not in dst_map:
                    src_map.pop(name, None)
        load = rank_list_for_transform(rank, src_map, dst_map, self.n_src, self.n_dst,
                                       self.src.source if self.src else "")
        names = [n for n in self._names(load, rank) if not (self._dropped(n, self.src, src_map) and
                                                      self._dropped(n, self.dst, dst_map))]
        return self._rank_plan(rank, local, dst_file, names, src_map, dst_map, load)

    def by_stage_rank(self, local: int, prefix: str, suffix: str) -> RankPlan:
        src, dst = self.src, self.dst
        stage = src.file_stage  # type: ignore[union-attr]
        load = [stage * self.n_src + x for x in range(self.n_src)]
        dst_map = {n: p for n, p in dst.params.items() if n in src.params}  # type: ignore[union-attr]
        names = self._names(load, local)
        dst_file = f"rank_{local}/{prefix}{local}_part{stage}{suffix}"
        return self._rank_plan(local, local, dst_file, names, dict(src.params), dst_map, load[::-1])  # type: ignore

    @staticmethod
    def _dropped(name: str, full: Strategy | None, pruned: Mapping | None) -> bool:
        """`_parameter_not_in_local_stage`."""
        return full is None or pruned is None or (name in full.params and name not in pruned)

    def _dst_map(self, rank: int, stage: int) -> dict | None:
        if self.dst is None:
            return None
        return {
            n: self.dst.layout_for_rank(n, rank) for n, p in self.dst.params.items() if stage in p.stages
        }

    # -- building the rank's shards -----------------------------------------------------------------------

    def _rank_plan(self, rank, local, dst_file, names, src_map, dst_map, load_desc) -> RankPlan:
        transformed, copied = [], []
        for name in names:
            if not any(name in self.source.entries.get(r, {}) for r in load_desc):  # a str entry
                copied.append(name)
            elif (src_map is None or name in src_map) and (dst_map is None or name in dst_map):
                transformed.append(name)
            else:
                copied.append(name)
        if not transformed:
            raise PlanError(
                f"none of the parameters in {self.source.path} are in the source or destination strategy; "
                "check that the strategy files belong to this checkpoint"
            )
        last = transformed[-1]
        device_num = self._src_layout(last).devices_per_stage if self.src else 1
        shards = [self._transform(name, rank, local, dst_map) for name in transformed]
        extras = []
        for name in copied:
            src_rank = self._copy_source(name, local % device_num, load_desc)
            if name in self.source.extras.get(src_rank, {}):
                extras.append(TextRecord(name, self.source.extras[src_rank][name]))
            else:
                shards.append(self._copy(name, src_rank))
        return RankPlan(rank, dst_file, tuple(shards), tuple(extras), tuple(transformed + copied))

    def _src_layout(self, name: str) -> ParamLayout:
        """The source layout MindSpore uses (the lowest stage's); a parameter shared by pipeline stages with
        different layouts is read only from the stages laid out that way, as MindSpore (lowest rank wins) does."""
        chosen = self.src.params[name]  # type: ignore[union-attr]
        key = (chosen.dev_matrix, chosen.tensor_map, chosen.opt_shard_step, chosen.opt_shard_size)
        stages = tuple(s for s, p in self.src.entries[name]  # type: ignore[union-attr]
                       if (p.dev_matrix, p.tensor_map, p.opt_shard_step, p.opt_shard_size) == key)
        entry = next(e[name] for e in self.source.entries.values() if name in e)
        return param_layout(name, chosen, len(entry.shape), stages, self.src.source)  # type: ignore[union-attr]

    def _copy_source(self, name: str, src_local: int, load_desc: list[int]) -> int:
        """The lowest loaded global rank with local index `src_local` whose file has `name`."""
        stages = sorted({r // self.n_src for r in load_desc})
        for s in stages:
            rank = s * self.n_src + src_local
            if name in self.source.entries.get(rank, {}) or name in self.source.extras.get(rank, {}):
                return rank
        raise PlanError(f"parameter {name!r}: the checkpoint of source rank {src_local} is missing it")

    def _copy(self, name: str, src_rank: int) -> ShardPlan:
        entry = self.source.entries[src_rank][name]
        info = self.infos.get(name)
        if info is None:
            info = self.infos[name] = ParamInfo(name, entry.shape, entry.dtype, COMPLETE, COMPLETE, COPY)
        if not isinstance(info.source, PerRankCopy) or (info.shape, info.src_dtype) != (entry.shape, entry.dtype):
            raise PlanError(f"parameter {name!r} is both resliced and copied as is on different ranks; "
                            "check that the strategy files belong to this checkpoint")
        box = Box.full(entry.shape)
        return self._shard(name, box, ((src_rank, box, box),))

    def _transform(self, name: str, rank: int, local: int, dst_map) -> ShardPlan:
        info = self.infos.get(name)
        if info is not None and isinstance(info.source, PerRankCopy) and name not in self._grids:
            raise PlanError(f"parameter {name!r} is both resliced and copied as is on different ranks; "
                            "check that the strategy files belong to this checkpoint")
        src_layout = info.src_layout if info else (self._src_layout(name) if self.src else COMPLETE)
        shape = info.shape if info else full_shape(name, src_layout, self.source.entries)[0]
        if dst_map is None:
            dst_layout = COMPLETE
        else:
            dst_layout = param_layout(name, dst_map[name], len(shape), dst_map[name].stages,
                                      self.dst.source)  # type: ignore[union-attr]
            dst_layout.check_shape(name, shape)
        if info is None:
            dtype = full_shape(name, src_layout, self.source.entries)[1]
            info = ParamInfo(name, shape, dtype, src_layout, dst_layout)
            self._grids[name] = source_grid(name, shape, src_layout, self.source.entries)
        elif info.dst_layout != dst_layout:  # a shared parameter laid out differently per stage: write per rank
            info = replace(info, source=COPY)
        self.infos[name] = info
        box = dst_layout.box(info.shape, local % dst_layout.devices_per_stage)
        grid = self._grids[name]
        pick = self._mindspore_pick(info.src_layout, local) if self.exact else lowest_rank
        reads = cover(grid, box, pick)  # type: ignore[arg-type]
        return self._shard(name, box, tuple((r.src_rank, r.region, r.src_box) for r in reads))

    def _mindspore_pick(self, layout: ParamLayout, dst_local: int):
        """MindSpore's replica choice: keep the destination rank's coordinates on the source's replicated axes."""
        n = layout.devices_per_stage
        split = {a for axes in layout.spec for a in axes}
        rep = [i for i, (name, _) in enumerate(layout.mesh_axes) if name not in split]
        target = unravel(dst_local % n, layout.mesh_shape)

        def pick(cell: Cell, holders) -> int:
            for rank in holders:
                coords = unravel(rank % n, layout.mesh_shape)
                if all(coords[i] == target[i] for i in rep):
                    return rank
            return holders[0]

        return pick

    def _shard(self, key: str, box: Box, reads: tuple) -> ShardPlan:
        items = tuple(ReadItem(r, region, src_box) for r, region, src_box in reads)
        cache_key = (key, box, items)
        shard = self._covers.get(cache_key)
        if shard is None:
            shard = self._covers[cache_key] = ShardPlan(key, box, items)
        return shard
