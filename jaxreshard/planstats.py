"""The numbers `jaxreshard plan` prints about a plan: pure arithmetic, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from .box import Box
from .plan import Plan, ShardPlan


@dataclass(frozen=True, slots=True)
class RankStats:
    dst_rank: int
    dst_file: str
    src_files: tuple[str, ...]
    params: int
    read_bytes: int  # source bytes this rank's shards need (replicas shared with other ranks counted here too)
    write_bytes: int


@dataclass(frozen=True, slots=True)
class PlanStats:
    ranks: tuple[RankStats, ...]
    read_bytes: int  # bytes actually read: each distinct destination box is read once and shared by replicas
    write_bytes: int
    peak_buffer_bytes: int  # the largest parameter's distinct boxes, all in flight at once
    peak_param: str


def plan_stats(plan: Plan) -> PlanStats:
    """The numbers `jaxreshard plan` prints; pure arithmetic over the plan.

    Ranks that share one shards tuple (data-parallel replicas, see rankgroups.per_rank) are summed once.
    """
    itemsize = {p: (i.src_dtype.itemsize, i.dst_dtype.itemsize) for p, i in plan.params.items()}
    rank_stats = []
    distinct: dict[tuple[str, Box], ShardPlan] = {}
    summaries: dict[int, tuple[tuple[str, ...], int, int]] = {}  # id(shards) -> (files, read, write); plan keeps them
    write_total = 0
    for rank in plan.ranks:
        summary = summaries.get(id(rank.shards))
        if summary is None:
            summary = summaries[id(rank.shards)] = _summarise(plan, rank.shards, itemsize, distinct)
        files, read, write = summary
        write_total += write
        rank_stats.append(RankStats(rank.dst_rank, rank.dst_file, files, len(rank.shards), read, write))
    per_param: dict[str, int] = {}
    read_total = 0
    for (param, box), shard in distinct.items():
        src, dst = itemsize[param]
        size = box.size
        per_param[param] = per_param.get(param, 0) + size * src + (size * dst if dst != src else 0)
        read_total += sum(item.region.size for _, item in shard.source_reads()) * src
    peak_param = max(per_param, key=per_param.__getitem__, default="")
    return PlanStats(tuple(rank_stats), read_total, write_total, per_param.get(peak_param, 0), peak_param)


def _summarise(plan: Plan, shards: tuple[ShardPlan, ...], itemsize: dict[str, tuple[int, int]],
               distinct: dict[tuple[str, Box], ShardPlan]) -> tuple[tuple[str, ...], int, int]:  # fmt: skip
    """One rank's source files, read bytes and write bytes; records its distinct boxes in `distinct`."""
    read = write = 0
    files: dict[str, None] = {}
    for shard in shards:
        src, dst = itemsize[shard.param]
        distinct[(shard.param, shard.dst_box)] = shard
        write += shard.dst_box.size * dst
        for param, item in shard.source_reads():
            read += item.region.size * src
            files[str(plan.src_path(item, param))] = None
    return tuple(files), read, write
