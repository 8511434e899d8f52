"""The plan: for every destination rank and parameter, which box of which source file feeds which region.

Computed from headers and layouts alone, before any tensor byte is read, and checked: every destination box
is covered exactly once by source regions. The plan is plain frozen data, so `jaxreshard plan` can print it
and the executor only follows it (mergekit's planner/executor split, DCP's `ReadItem` box vocabulary).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import ml_dtypes
import numpy as np

from .box import Box
from .errors import FormatError, LayoutError, PlanError
from .formats.base import TensorEntry
from .layout import COMPLETE, ParamLayout


class LayoutLike(Protocol):
    """A native `Layout`, or an adapter (MindSpore strategy) that resolves names the same way."""

    @property
    def num_ranks(self) -> int: ...

    def resolve(self, params: Iterable[str]) -> dict[str, ParamLayout]: ...


@dataclass(frozen=True, slots=True)
class ParamInfo:
    param: str
    shape: tuple[int, ...]
    src_dtype: np.dtype
    dst_dtype: np.dtype
    src_layout: ParamLayout
    dst_layout: ParamLayout


@dataclass(frozen=True, slots=True)
class ReadItem:
    """Copy `region` (global coordinates) from the tensor of `src_rank`, which holds `src_box`."""

    src_rank: int
    region: Box
    src_box: Box


@dataclass(frozen=True, slots=True)
class ShardPlan:
    param: str
    dst_box: Box
    reads: tuple[ReadItem, ...]


@dataclass(frozen=True, slots=True)
class RankPlan:
    dst_rank: int
    dst_file: str  # relative to the destination directory
    shards: tuple[ShardPlan, ...]


@dataclass(frozen=True)
class Plan:
    params: dict[str, ParamInfo]  # in output order
    ranks: tuple[RankPlan, ...]
    src_entries: Mapping[int, Mapping[str, TensorEntry]] = field(repr=False)

    def src_path(self, read: ReadItem, param: str) -> Path:
        return self.src_entries[read.src_rank][param].path


ReplicaChooser = Callable[[str, tuple[int, ...], Sequence[int]], int]


def lowest_rank(param: str, cell: tuple[int, ...], holders: Sequence[int]) -> int:
    """Default replica choice: the lowest global source rank holding the block."""
    return holders[0]


def make_plan(
    src_entries: Mapping[int, Mapping[str, TensorEntry]],
    src_layout: LayoutLike | None,
    dst_layout: LayoutLike | None,
    *,
    prefix: str = "checkpoint_",
    suffix: str = ".safetensors",
    dst_dtype: np.dtype | None = None,
    dst_ranks: Iterable[int] | None = None,
    choose_replica: ReplicaChooser = lowest_rank,
) -> Plan:
    """Plan a conversion; raises `PlanError`/`LayoutError`/`FormatError` before anything is written.

    `src_entries` maps each global source rank to its tensors (one rank, 0, for a complete source);
    `None` layouts mean complete. `dst_ranks` restricts the plan to some destination ranks.
    """
    names = merge_orders([list(src_entries[rank]) for rank in sorted(src_entries)])
    src_params = src_layout.resolve(names) if src_layout is not None else {p: COMPLETE for p in names}
    dst_params = dst_layout.resolve(names) if dst_layout is not None else {p: COMPLETE for p in names}
    src_total = src_layout.num_ranks if src_layout is not None else 1
    extra = sorted(r for r in src_entries if r >= src_total)
    if extra:
        raise PlanError(
            f"the source has rank folders {extra} but its layout has only {src_total} ranks; "
            "pass the source layout it was saved with"
        )
    missing = [r for r in range(src_total) if r not in src_entries]
    if missing and dst_ranks is None:  # with dst_ranks (one node's share) only the ranks actually read matter
        raise PlanError(
            f"the source layout has {src_total} ranks but rank folders {format_ranks(missing)} are missing; "
            "copy them in (or convert only some destination ranks)"
        )
    infos = {}
    for param in names:
        shape, src_dtype = _full_shape(param, src_params[param], src_entries)
        dst_params[param].check_shape(param, shape)
        out_dtype = dst_dtype if dst_dtype is not None and is_floating(src_dtype) else src_dtype
        infos[param] = ParamInfo(param, shape, src_dtype, np.dtype(out_dtype), src_params[param], dst_params[param])

    dst_total = dst_layout.num_ranks if dst_layout is not None else 1
    wanted = range(dst_total) if dst_ranks is None else sorted(set(dst_ranks))
    bad = [r for r in wanted if not 0 <= r < dst_total]
    if bad:
        raise PlanError(f"destination ranks {bad} do not exist; the destination layout has ranks 0-{dst_total - 1}")
    grids = {p: _src_grid(info, src_entries, choose_replica) for p, info in infos.items()}
    covers: dict[tuple[str, Box], ShardPlan] = {}
    ranks = []
    for rank in wanted:
        shards = []
        for param, info in infos.items():
            n = info.dst_layout.devices_per_stage
            if rank // n not in info.dst_layout.stages:
                continue
            box = info.dst_layout.box(info.shape, rank % n)
            key = (param, box)
            if key not in covers:
                covers[key] = ShardPlan(param, box, _cover(info, box, grids[param]))
            shards.append(covers[key])
        ranks.append(RankPlan(rank, f"rank_{rank}/{prefix}{rank}{suffix}", tuple(shards)))
    return Plan(infos, tuple(ranks), src_entries)


def is_floating(dtype: np.dtype) -> bool:
    """Floating point, bfloat16 included (ml_dtypes types are not np.floating subtypes)."""
    return dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16)


def merge_orders(orders: Sequence[Sequence[str]]) -> list[str]:
    """One order consistent with every rank file's order, so split-then-merge restores the original order.

    Each rank file keeps a subsequence of the original order (pipeline stages hold disjoint slices of it),
    so a topological merge of the per-file orders recovers it; ties go to the name seen first. If the files
    disagree (a cycle), the remaining names follow first appearance.
    """
    first_seen: dict[str, int] = {}
    successors: dict[str, set[str]] = {}
    indegree: dict[str, int] = {}
    for order in orders:
        for name in order:
            first_seen.setdefault(name, len(first_seen))
            successors.setdefault(name, set())
            indegree.setdefault(name, 0)
        for a, b in zip(order, order[1:]):
            if b not in successors[a]:
                successors[a].add(b)
                indegree[b] += 1
    ready = [(first_seen[n], n) for n, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        out.append(name)
        for nxt in successors[name]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                heapq.heappush(ready, (first_seen[nxt], nxt))
    if len(out) < len(first_seen):
        done = set(out)
        out += sorted((n for n in first_seen if n not in done), key=first_seen.__getitem__)
    return out


def _full_shape(
    param: str, layout: ParamLayout, src_entries: Mapping[int, Mapping[str, TensorEntry]]
) -> tuple[tuple[int, ...], np.dtype]:
    """Infer the full shape from the first source rank holding `param` and check every other holder."""
    holders = [r for r in layout.global_ranks() if param in src_entries.get(r, {})]
    if not holders:
        found = [r for r in sorted(src_entries) if param in src_entries[r]]
        raise PlanError(
            f"parameter {param!r} is in source ranks {found} but its source layout puts it on ranks "
            f"{layout.global_ranks()[:8]}; check the source layout's stages"
        )
    first = src_entries[holders[0]][param]
    blocks = layout.blocks_per_dim(len(first.shape))
    if len(layout.spec) > len(first.shape):
        raise LayoutError(f"{first.path}: parameter {param!r} has {len(first.shape)} dims but its source spec has more")
    shape = tuple(s * k for s, k in zip(first.shape, blocks))
    for rank in holders[1:]:
        entry = src_entries[rank][param]
        if entry.shape != first.shape or entry.dtype != first.dtype:
            raise FormatError(
                f"{entry.path}: parameter {param!r} on source rank {rank} is {entry.dtype}{list(entry.shape)} but "
                f"rank {holders[0]} has {first.dtype}{list(first.shape)}; the source layout does not match the files"
            )
    return shape, first.dtype


@dataclass(frozen=True, slots=True)
class _Grid:
    block: tuple[int, ...]  # block size per dim (0 for empty dims)
    owner: dict[tuple[int, ...], int]  # block coords -> chosen source rank
    missing: dict[tuple[int, ...], list[int]]  # block coords with no file -> ranks that should hold it


def _src_grid(info: ParamInfo, src_entries: Mapping[int, Mapping[str, TensorEntry]], choose: ReplicaChooser) -> _Grid:
    layout = info.src_layout
    ndim = len(info.shape)
    blocks = layout.blocks_per_dim(ndim)
    n = layout.devices_per_stage
    holders: dict[tuple[int, ...], list[int]] = {}
    expected: dict[tuple[int, ...], list[int]] = {}
    for rank in layout.global_ranks():
        cell = layout.block_coords(rank % n, ndim)
        expected.setdefault(cell, []).append(rank)
        if info.param in src_entries.get(rank, {}):
            holders.setdefault(cell, []).append(rank)
        elif rank in src_entries:
            path = next(iter(src_entries[rank].values())).path if src_entries[rank] else f"rank {rank}"
            raise PlanError(
                f"{path}: parameter {info.param!r} is missing on source rank {rank}, which its layout says holds "
                f"block {layout.box(info.shape, rank % n)}; the file is incomplete or the layout is wrong"
            )
    owner = {cell: choose(info.param, cell, sorted(ranks)) for cell, ranks in holders.items()}
    missing = {cell: ranks for cell, ranks in expected.items() if cell not in holders}
    block = tuple(s // k for s, k in zip(info.shape, blocks))
    return _Grid(block, owner, missing)


def _cover(info: ParamInfo, dst_box: Box, grid: _Grid) -> tuple[ReadItem, ...]:
    if dst_box.size == 0:
        return ()
    ranges = [range(a // b, (z - 1) // b + 1) for a, z, b in zip(dst_box.start, dst_box.stop, grid.block)]
    reads = []
    for cell in itertools.product(*ranges):
        src_box = Box(
            tuple(c * b for c, b in zip(cell, grid.block)), tuple((c + 1) * b for c, b in zip(cell, grid.block))
        )
        if cell not in grid.owner:
            wanted = grid.missing.get(cell, [])
            raise PlanError(
                f"parameter {info.param!r}: block {src_box} is needed for destination box {dst_box} but no source "
                f"file holds it; missing source ranks {wanted} (their rank_<n> folder or the parameter is absent)"
            )
        region = src_box.intersect(dst_box)
        if region is not None:
            reads.append(ReadItem(grid.owner[cell], region, src_box))
    check_exact_cover(info.param, dst_box, [r.region for r in reads])
    return tuple(reads)


def format_ranks(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (for messages and listings)."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)


def check_exact_cover(param: str, box: Box, regions: Sequence[Box]) -> None:
    """Raise `PlanError` unless `regions` tile `box` exactly: inside it, no overlap, no gap."""
    for region in regions:
        if not box.contains(region):
            raise PlanError(f"parameter {param!r}: region {region} lies outside destination box {box}")
    for a, b in itertools.combinations(regions, 2):
        if a.intersect(b) is not None:
            raise PlanError(f"parameter {param!r}: source regions {a} and {b} overlap in destination box {box}")
    covered = sum(r.size for r in regions)
    if covered != box.size:
        raise PlanError(f"parameter {param!r}: source regions cover {covered} of {box.size} elements of {box}")


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
            for item in shard.reads:
                read += item.region.size * info.src_dtype.itemsize
                files[str(plan.src_path(item, shard.param))] = None
        write_total += write
        rank_stats.append(RankStats(rank.dst_rank, rank.dst_file, tuple(files), len(rank.shards), read, write))
    per_param: dict[str, int] = {}
    read_total = 0
    for (param, box), shard in distinct.items():
        info = plan.params[param]
        per_param[param] = per_param.get(param, 0) + box.size * info.src_dtype.itemsize
        if info.dst_dtype != info.src_dtype:
            per_param[param] += box.size * info.dst_dtype.itemsize
        read_total += sum(item.region.size for item in shard.reads) * info.src_dtype.itemsize
    peak_param = max(per_param, key=per_param.__getitem__, default="")
    return PlanStats(tuple(rank_stats), read_total, write_total, per_param.get(peak_param, 0), peak_param)
