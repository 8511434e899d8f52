"""Which source blocks cover a destination box: the geometry at the heart of every plan.

A source layout cuts a parameter into a regular grid of blocks; each grid cell is held by one or more
source ranks (replicas). A destination box is covered by the cells it overlaps, each contributing the
intersection (DCP's `_shards_get_overlap_region_wrt_saved_tensor`, done on the grid instead of pairwise).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from .box import Box
from .errors import PlanError
from .formats.base import TensorEntry
from .layout import ParamLayout

Cell = tuple[int, ...]
Pick = Callable[[Cell, Sequence[int]], int]  # (cell, holder ranks ascending) -> the source rank to read


@dataclass(frozen=True, slots=True)
class ReadItem:
    """Copy `region` (global coordinates) from the tensor of `src_rank`, which holds `src_box`."""

    src_rank: int
    region: Box
    src_box: Box


@dataclass(frozen=True, slots=True)
class SourceGrid:
    param: str
    block: tuple[int, ...]  # block size per dim (0 for empty dims)
    holders: dict[Cell, list[int]]  # block coords -> global source ranks holding it, ascending (read-only: shared)
    missing: dict[Cell, list[int]]  # block coords no file holds -> ranks that should
    # equal keys mean equal `block` and `holders`, so a box's cover can be computed once for all such grids
    key: Hashable = field(default=None, compare=False)


def lowest_rank(cell: Cell, holders: Sequence[int]) -> int:
    """Default replica choice: the lowest global source rank holding the block."""
    return holders[0]


def source_grid(
    param: str,
    shape: tuple[int, ...],
    layout: ParamLayout,
    src_entries: Mapping[int, Mapping[str, TensorEntry]],
    *,
    strict: bool = True,
) -> SourceGrid:
    """The grid of `param` under its source layout. With `strict`, a rank file that exists but lacks the
    parameter its layout says it holds is an error even if a replica could stand in.

    The rank -> block map is computed once per (layout, ndim) and, when every rank holds the parameter (the
    usual case), the holders map is shared by all such grids: building a grid costs one dict lookup per rank.
    """
    ndim = len(shape)
    cells, expected = _cells(layout, ndim)
    absent = [rank for rank, _ in cells if param not in src_entries.get(rank, _EMPTY)]
    if strict:
        for rank in absent:
            if rank in src_entries:
                path = next(iter(src_entries[rank].values())).path if src_entries[rank] else f"rank {rank}"
                raise PlanError(
                    f"{path}: parameter {param!r} is missing on source rank {rank}, which its layout says holds "
                    f"block {layout.box(shape, rank % layout.devices_per_stage)}; the file is incomplete or the "
                    "layout is wrong"
                )
    block = tuple(s // k for s, k in zip(shape, layout.blocks_per_dim(ndim)))
    if not absent:
        return SourceGrid(param, block, expected, {}, (block, layout, ()))
    gone = set(absent)
    holders: dict[Cell, list[int]] = {}
    for rank, cell in cells:
        if rank not in gone:
            holders.setdefault(cell, []).append(rank)
    missing = {cell: ranks for cell, ranks in expected.items() if cell not in holders}
    return SourceGrid(param, block, {c: sorted(r) for c, r in holders.items()}, missing, (block, layout, tuple(absent)))


_EMPTY: Mapping[str, TensorEntry] = {}


@lru_cache(maxsize=4096)
def _cells(layout: ParamLayout, ndim: int) -> tuple[tuple[tuple[int, Cell], ...], dict[Cell, list[int]]]:
    """Every global rank of `layout` with the block it holds, and block -> its ranks ascending (shared:
    callers must not mutate it)."""
    n = layout.devices_per_stage
    cells = tuple((rank, layout.block_coords(rank % n, ndim)) for rank in layout.global_ranks())
    expected: dict[Cell, list[int]] = {}
    for rank, cell in cells:
        expected.setdefault(cell, []).append(rank)
    return cells, {c: sorted(r) for c, r in expected.items()}


def cover(grid: SourceGrid, dst_box: Box, pick: Pick = lowest_rank) -> tuple[ReadItem, ...]:
    """The reads that fill `dst_box`, checked to tile it exactly."""
    if dst_box.size == 0:
        return ()
    ranges = [range(a // b, (z - 1) // b + 1) for a, z, b in zip(dst_box.start, dst_box.stop, grid.block)]
    reads = []
    for cell in itertools.product(*ranges):
        src_box = Box(
            tuple(c * b for c, b in zip(cell, grid.block)), tuple((c + 1) * b for c, b in zip(cell, grid.block))
        )
        if cell not in grid.holders:
            raise PlanError(
                f"parameter {grid.param!r}: block {src_box} is needed for destination box {dst_box} but no source "
                f"file holds it; missing source ranks {grid.missing.get(cell, [])} (their rank_<n> folder or the "
                "parameter is absent)"
            )
        region = src_box.intersect(dst_box)
        if region is not None:
            reads.append(ReadItem(pick(cell, grid.holders[cell]), region, src_box))
    check_exact_cover(grid.param, dst_box, [r.region for r in reads])
    return tuple(reads)


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
