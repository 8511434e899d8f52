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
    """The numbers `jaxreshard plan` prints; pure arithmetic over the plan."""
    rank_stats = []
    distinct: dict[tuple[str, Box], ShardPlan] = {}
    write_total = 0
    for rank in plan.ranks:
        read = write = 0
        files: dict[str, None] = {}
        for shard in rank.shards:
            info = plan.params[shard.param]
            distinct[(shard.param, shard.dst_box)] = shard
            write += shard.dst_box.size * info.dst_dtype.itemsize
            for param, item in shard.source_reads():
                read += item.region.size * info.src_dtype.itemsize
                files[str(plan.src_path(item, param))] = None
        write_total += write
        rank_stats.append(RankStats(rank.dst_rank, rank.dst_file, tuple(files), len(rank.shards), read, write))
    per_param: dict[str, int] = {}
    read_total = 0
    for (param, box), shard in distinct.items():
        info = plan.params[param]
        per_param[param] = per_param.get(param, 0) + box.size * info.src_dtype.itemsize
        if info.dst_dtype != info.src_dtype:
            per_param[param] += box.size * info.dst_dtype.itemsize
        read_total += sum(item.region.size for _, item in shard.source_reads()) * info.src_dtype.itemsize
    peak_param = max(per_param, key=per_param.__getitem__, default="")
    return PlanStats(tuple(rank_stats), read_total, write_total, per_param.get(peak_param, 0), peak_param)
