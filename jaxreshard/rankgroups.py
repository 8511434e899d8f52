"""Planning per layout, not per parameter x rank: the arithmetic that keeps a 90k-tensor x 1024-rank plan small.

Parameters with the same shape and destination layout (mesh, spec, stages) hold the same box on every rank, so
their boxes are computed once per group (`layout_groups`). A rank's shards are then one pick per parameter from
that parameter's distinct shards, and ranks that pick the same box of every group (data-parallel replicas) share
one tuple (`per_rank`), built with C-speed `map`/`compress` rather than a Python loop per (parameter, rank).
Pure: no I/O, no JAX; generic over what a shard is (plan.py builds `ShardPlan`s).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import compress
from typing import TypeVar

import numpy as np

from .box import Box
from .paramlayout import ParamLayout

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LayoutGroup:
    """One (shape, destination layout): the distinct boxes the wanted ranks hold, and which one each holds."""

    devices_per_stage: int
    stages: frozenset[int]
    boxes: tuple[Box, ...]  # distinct boxes held by wanted ranks, in rank order of first holder
    index: tuple[int, ...]  # local rank -> position in `boxes`; -1 where no wanted rank holds that local box

    def pick(self, rank: int) -> int:
        """Position in `boxes` of global `rank`'s box, or -1 when its stage does not hold the group."""
        n = self.devices_per_stage
        return self.index[rank % n] if rank // n in self.stages else -1


def layout_groups(
    items: Sequence[tuple[tuple[int, ...], ParamLayout]], wanted: Sequence[int]
) -> tuple[list[LayoutGroup], list[int]]:
    """The groups of (shape, layout) `items` and each item's group number; boxes only of `wanted` ranks."""
    numbers: dict[tuple[tuple[int, ...], ParamLayout], int] = {}
    groups: list[LayoutGroup] = []
    group_of: list[int] = []
    for item in items:
        g = numbers.get(item)
        if g is None:
            g = numbers[item] = len(groups)
            groups.append(_group(*item, wanted))
        group_of.append(g)
    return groups, group_of


def _group(shape: tuple[int, ...], layout: ParamLayout, wanted: Sequence[int]) -> LayoutGroup:
    n = layout.devices_per_stage
    stages = frozenset(layout.stages)
    index = [-1] * n
    boxes: dict[Box, int] = {}
    for rank in wanted:
        local = rank % n
        if rank // n in stages and index[local] < 0:
            index[local] = boxes.setdefault(layout.box(shape, local), len(boxes))
    return LayoutGroup(n, stages, tuple(boxes), tuple(index))


def per_rank(
    groups: Sequence[LayoutGroup], group_of: Sequence[int], tables: Sequence[Sequence[T]], wanted: Sequence[int]
) -> Iterator[tuple[int, tuple[T, ...]]]:
    """`(rank, shards)` per wanted rank: item i contributes `tables[i][pick]` when its group's box `pick` is held
    by the rank, in item order. Ranks with the same picks get the same tuple object (callers may rely on it to
    summarise once per distinct tuple)."""
    gid = np.asarray(group_of, dtype=np.int64)
    built: dict[tuple[int, ...], tuple[T, ...]] = {}
    for rank in wanted:
        picks = tuple(g.pick(rank) for g in groups)
        shards = built.get(picks)
        if shards is None:
            idx = np.asarray(picks, dtype=np.int64)[gid] if len(gid) else np.zeros(0, dtype=np.int64)
            held = idx >= 0
            shards = built[picks] = tuple(map(_item, compress(tables, held.tolist()), idx[held].tolist()))
        yield rank, shards


def _item(table: Sequence[T], i: int) -> T:
    return table[i]
