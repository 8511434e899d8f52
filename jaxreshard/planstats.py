"""The numbers `jaxreshard plan` prints about a plan: pure arithmetic, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter, itemgetter, mul

import numpy as np

from .box import Box
from .coverage import ReadItem
from .plan import Plan, ShardPlan, gc_paused


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


@gc_paused()
def plan_stats(plan: Plan) -> PlanStats:
    """The numbers `jaxreshard plan` prints; pure arithmetic over the plan.

    Ranks that share one shards tuple (data-parallel replicas, see rankgroups.per_rank) are summed once, and
    a rank's tens of thousands of shards are summed with C-level `map`s over memos keyed by object identity
    (the boxes and reads tuples one layout group shares), so a 90k-tensor x 1024-rank plan sums in a second.
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
    per_param, read_total = tally.distinct_totals()
    peak_param = max(per_param, key=per_param.__getitem__, default="")
    return PlanStats(tuple(rank_stats), read_total, write_total, per_param.get(peak_param, 0), peak_param)


_PARAM, _BOX, _READS, _PIECES, _PATH = (attrgetter(a) for a in ("param", "dst_box", "reads", "pieces", "path"))
_START, _STOP = attrgetter("start"), attrgetter("stop")


class _Tally:
    """Sums over a plan's shards, memoised by the identity of the objects shards share (boxes, reads tuples);
    `_keep` holds every memoised object so that no id is reused while the tally lives."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._src = {p: i.src_dtype.itemsize for p, i in plan.params.items()}
        self._dst = {p: i.dst_dtype.itemsize for p, i in plan.params.items()}
        self.distinct: dict[tuple[str, tuple[int, ...], tuple[int, ...]], ShardPlan] = {}  # read once each
        self._sizes: dict[int, int] = {}  # id(box) -> elements
        self._reads: dict[int, tuple[int, tuple[int, ...]]] = {}  # id(reads) -> (elements, source ranks in order)
        self._keep: list[object] = []
        self._composed = False  # a rank went through `_rank_composed`, which memoises nothing
        # the last rank's parameters, their source and destination item sizes, its files per source ranks read
        self._last: tuple[list[str], list[int], list[int], dict[tuple[int, ...], tuple[str, ...]]] = ([], [], [], {})

    def _box_sizes(self, boxes: list[Box]) -> list[int]:
        ids = list(map(id, boxes))
        for key, box in dict(zip(ids, boxes)).items():
            if key not in self._sizes:
                self._sizes[key] = box.size
                self._keep.append(box)
        return list(map(self._sizes.__getitem__, ids))

    def _own_reads(self, reads: list[tuple[ReadItem, ...]]) -> list[tuple[int, tuple[int, ...]]]:
        ids = list(map(id, reads))
        for key, items in dict(zip(ids, reads)).items():
            if key not in self._reads:
                ranks = tuple(dict.fromkeys(item.src_rank for item in items))
                self._reads[key] = (sum(item.region.size for item in items), ranks)
                self._keep.append(items)
        return list(map(self._reads.__getitem__, ids))

    def rank(self, shards: tuple[ShardPlan, ...]) -> tuple[tuple[str, ...], int, int]:
        """One rank's source files (in read order), read bytes and write bytes."""
        if any(map(_PIECES, shards)):
            return self._rank_composed(shards)
        params, boxes = list(map(_PARAM, shards)), list(map(_BOX, shards))
        self.distinct.update(zip(zip(params, map(_START, boxes), map(_STOP, boxes)), shards))
        if params != self._last[0]:  # ranks of one stage hold the same parameters: their lookups are shared
            self._last = (params, list(map(self._src.__getitem__, params)), list(map(self._dst.__getitem__, params)),
                          {})  # fmt: skip
        _, src, dst, files_by_ranks = self._last
        write = sum(map(mul, self._box_sizes(boxes), dst))
        memos = self._own_reads(list(map(_READS, shards)))
        read = sum(map(mul, map(itemgetter(0), memos), src))
        ranks = list(map(itemgetter(1), memos))
        one = set(ranks)
        key = next(iter(one)) if len(one) == 1 else None  # every shard read from the same source rank(s)
        if key is None or key not in files_by_ranks:
            entries = self.plan.src_entries
            paths = [entries[r][param].path for param, rs in zip(params, ranks) for r in rs]
            unique = dict(zip(map(id, paths), paths)).values()
            files = tuple(dict.fromkeys(map(str, unique)))
            if key is None:
                return files, read, write
            files_by_ranks[key] = files
        return files_by_ranks[key], read, write

    def _rank_composed(self, shards: tuple[ShardPlan, ...]) -> tuple[tuple[str, ...], int, int]:
        """`rank` for shards some of which are composed of pieces of other tensors (transform rules)."""
        self._composed = True
        read = write = 0
        files: dict[str, None] = {}
        for shard in shards:
            src, dst = self._src[shard.param], self._dst[shard.param]
            self.distinct[(shard.param, shard.dst_box.start, shard.dst_box.stop)] = shard
            write += shard.dst_box.size * dst
            for param, item in shard.source_reads():
                read += item.region.size * src
                files[str(self.plan.src_path(item, param))] = None
        return tuple(files), read, write

    def distinct_totals(self) -> tuple[dict[str, int], int]:
        """Bytes in flight per parameter (each distinct box, plus its cast copy; parameters in the order the
        distinct boxes first appear) and bytes read in all."""
        shards = list(self.distinct.values())
        params = list(map(_PARAM, shards))
        if self._composed:  # some boxes and reads were not memoised by `rank`
            sizes = self._box_sizes(list(map(_BOX, shards)))
            elems = map(itemgetter(0), self._own_reads(list(map(_READS, shards))))
        else:  # every distinct shard passed through `rank`: its box and reads are memoised
            sizes = list(map(self._sizes.__getitem__, map(id, map(_BOX, shards))))
            elems = map(itemgetter(0), map(self._reads.__getitem__, map(id, map(_READS, shards))))
        read_total = sum(map(mul, elems, map(self._src.__getitem__, params)))
        for shard in filter(_PIECES, shards):
            pieces = sum(item.region.size for piece in shard.pieces for item in piece.reads)
            read_total += pieces * self._src[shard.param]
        flight = {p: self._src[p] + (self._dst[p] if self._dst[p] != self._src[p] else 0) for p in self._src}
        order = list(dict.fromkeys(params))
        number = {p: i for i, p in enumerate(order)}
        acc = np.zeros(len(order), dtype=np.int64)
        np.add.at(acc, np.fromiter(map(number.__getitem__, params), np.int64, len(params)),
                  np.fromiter(map(mul, sizes, map(flight.__getitem__, params)), np.int64, len(params)))
        return dict(zip(order, acc.tolist())), read_total
