"""The numbers `jaxreshard plan` prints about a plan: pure arithmetic, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter, itemgetter, mul

from .box import Box
from .coverage import ReadItem
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

    Ranks that share one shards tuple (data-parallel replicas, see rankgroups.per_rank) are summed once, and
    the reads tuples parameters share (one cover per layout and box) are measured once.
    """
    tally = _Tally(plan)
    rank_stats = []
    summaries: dict[int, tuple[tuple[str, ...], int, int]] = {}  # id(shards) -> (files, read, write); plan keeps them
    write_total = 0
    for rank in plan.ranks:
        summary = summaries.get(id(rank.shards))
        if summary is None:
            summary = summaries[id(rank.shards)] = tally.rank(rank.shards)
        files, read, write = summary
        write_total += write
        rank_stats.append(RankStats(rank.dst_rank, rank.dst_file, files, len(rank.shards), read, write))
    per_param: dict[str, int] = {}
    read_total = 0
    for (param, box), shard in tally.distinct.items():
        src, dst = tally.itemsize[param]
        size = box.size
        per_param[param] = per_param.get(param, 0) + size * src + (size * dst if dst != src else 0)
        read_total += tally.read_elems(shard) * src
    peak_param = max(per_param, key=per_param.__getitem__, default="")
    return PlanStats(tuple(rank_stats), read_total, write_total, per_param.get(peak_param, 0), peak_param)


_PARAM, _BOX, _READS, _PIECES, _SIZE = (attrgetter(a) for a in ("param", "dst_box", "reads", "pieces", "size"))


class _Tally:
    """Per-rank sums over a plan. A rank's tens of thousands of shards are summed with C-level `map`s, and the
    numbers of each reads tuple (shared by every parameter of one layout and box) are computed once."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.itemsize = {p: (i.src_dtype.itemsize, i.dst_dtype.itemsize) for p, i in plan.params.items()}
        self._src = {p: i[0] for p, i in self.itemsize.items()}
        self._dst = {p: i[1] for p, i in self.itemsize.items()}
        self.distinct: dict[tuple[str, Box], ShardPlan] = {}  # each distinct destination box, read once
        self._reads: dict[int, tuple[int, tuple[int, ...]]] = {}  # id(reads) -> (elements, source ranks in order)
        self._keep: list[tuple[ReadItem, ...]] = []  # keeps the memoised tuples (and so their ids) alive

    def _own_reads(self, reads: tuple[ReadItem, ...]) -> tuple[int, tuple[int, ...]]:
        memo = self._reads.get(id(reads))
        if memo is None:
            ranks = tuple(dict.fromkeys(item.src_rank for item in reads))
            memo = self._reads[id(reads)] = (sum(item.region.size for item in reads), ranks)
            self._keep.append(reads)
        return memo

    def read_elems(self, shard: ShardPlan) -> int:
        elems = self._own_reads(shard.reads)[0]
        return elems + sum(item.region.size for piece in shard.pieces for item in piece.reads)

    def rank(self, shards: tuple[ShardPlan, ...]) -> tuple[tuple[str, ...], int, int]:
        """One rank's source files (in read order), read bytes and write bytes."""
        if any(map(_PIECES, shards)):
            return self._rank_composed(shards)
        params, boxes = list(map(_PARAM, shards)), list(map(_BOX, shards))
        self.distinct.update(zip(zip(params, boxes), shards))
        write = sum(map(mul, map(_SIZE, boxes), map(self._dst.__getitem__, params)))
        memos = list(map(self._own_reads, map(_READS, shards)))
        read = sum(map(mul, map(itemgetter(0), memos), map(self._src.__getitem__, params)))
        entries = self.plan.src_entries
        paths = {id(path): path for param, (_, ranks) in zip(params, memos) for r in ranks
                 for path in (entries[r][param].path,)}  # fmt: skip
        return tuple(dict.fromkeys(map(str, paths.values()))), read, write

    def _rank_composed(self, shards: tuple[ShardPlan, ...]) -> tuple[tuple[str, ...], int, int]:
        """`rank` for shards some of which are composed of pieces of other tensors (transform rules)."""
        read = write = 0
        files: dict[str, None] = {}
        for shard in shards:
            src, dst = self.itemsize[shard.param]
            self.distinct[(shard.param, shard.dst_box)] = shard
            write += shard.dst_box.size * dst
            for param, item in shard.source_reads():
                read += item.region.size * src
                files[str(self.plan.src_path(item, param))] = None
        return tuple(files), read, write
