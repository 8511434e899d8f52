"""The source side of a plan: the order and full shapes of the source's parameters, and what each
destination parameter is made of (a source tensor as it is or renamed by a transform rule, or `Composed` of
regions of other source tensors), with the source regions that cover any destination box.

Kept apart from plan.py, which holds the plan's typed data and assembles it: this module answers "where do
the bytes come from", in the vocabulary of coverage.py (`ReadItem`) and composed.py (`Piece`).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import mul

import numpy as np

from .box import Box
from .composed import Composed, Piece, pieces
from .coverage import ReadItem, SourceGrid, cover, source_grid
from .errors import FormatError, LayoutError, PlanError
from .formats.base import TensorEntry
from .layout import COMPLETE, ParamLayout
from .rulemap import Target


class ParamSources:
    """The parameters a plan writes and where their bytes come from: each source tensor as it is (or renamed
    by a rule), or `Composed` of other source tensors (transform rules); boxes are covered from that."""

    def __init__(self, names: Sequence[str], shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 layouts: Mapping[str, ParamLayout], src_entries: Mapping[int, Mapping[str, TensorEntry]],
                 targets: Mapping[str, Target] | None, strict: bool = True) -> None:  # fmt: skip
        self.params: dict[str, tuple[tuple[int, ...], np.dtype, ParamLayout, Composed | None]] = {}  # None: read
        self.layouts: dict[str, tuple[tuple[int, ...], ParamLayout]] = {}  # by name in `entries`
        if targets is None:  # no transform rules: every tensor read as it is stored
            for param in names:
                shape, dtype = shapes[param]
                self.params[param] = (shape, dtype, layouts[param], None)
                self.layouts[param] = (shape, layouts[param])
            self.entries = src_entries
        else:
            self._targets(names, shapes, layouts, src_entries, targets)
        self.strict = strict
        self._grids: dict[str, SourceGrid] = {}
        # a box's reads depend on the grid's blocks and holders, not on the parameter's name: parameters with the
        # same shape and source layout share one cover per box (planning is per layout, not per tensor)
        self._covers: dict[tuple[int, Box], tuple[ReadItem, ...]] = {}
        self._batches: dict[tuple[int, int], tuple[tuple[Box, ...], list[tuple[ReadItem, ...]]]] = {}
        self._key_ids: dict[object, int] = {}  # grid key -> a small int (cheap to hash per box)
        self._grid_key: dict[str, int | None] = {}
        self.cover_calls = 0  # covers actually computed (tests bound it: a regression to per-tensor work shows)
        for name, (shape, layout) in self.layouts.items():  # checked up front: a file lacking a tensor is an error
            if all(name in self.entries.get(r, _NONE) for r in layout.rank_tuple):  # whatever ranks are asked
                # held by every rank its layout names: the grid is that of (shape, layout), built when first needed
                self._grid_key[name] = self._key_ids.setdefault((shape, layout), len(self._key_ids))
            else:
                self.grid(name)

    def _targets(self, names: Sequence[str], shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 layouts: Mapping[str, ParamLayout], src_entries: Mapping[int, Mapping[str, TensorEntry]],
                 targets: Mapping[str, Target]) -> None:  # fmt: skip
        """`params`, `layouts` and `entries` under transform rules: renamed or composed tensors."""
        stored: dict[str, str] = {}  # name in `entries` -> source name
        for param, target in targets.items():
            part = target.parts[0] if len(target.parts) == 1 else None
            if target.rule is None or (part is not None and part.is_whole(shapes[part.src_param][0])):
                src = part.src_param if part is not None else param
                self._store(stored, param, src)
                self.params[param] = (target.shape, target.dtype, layouts[src], None)
                self.layouts[param] = (target.shape, layouts[src])
            else:
                for p in target.parts:
                    self._store(stored, p.src_param, p.src_param)
                    self.layouts[p.src_param] = (shapes[p.src_param][0], layouts[p.src_param])
                self.params[param] = (target.shape, target.dtype, COMPLETE, Composed(target.parts, str(target.rule)))
        renamed = any(k != src for k, src in stored.items()) or len(stored) < len(names)
        self.entries = {r: {k: e[src] for k, src in stored.items() if src in e} for r, e in src_entries.items()} \
            if renamed else src_entries  # fmt: skip

    @staticmethod
    def _store(stored: dict[str, str], key: str, src: str) -> None:
        if stored.get(key, src) != src:
            raise PlanError(f"transform: {key!r} is both a destination name (from {src!r}) and a source tensor "
                            f"read under its own name ({stored[key]!r}); rename one of them")
        stored[key] = src

    def grid(self, name: str) -> SourceGrid:
        if name not in self._grids:
            shape, layout = self.layouts[name]
            grid = self._grids[name] = source_grid(name, shape, layout, self.entries, strict=self.strict)
            if name not in self._grid_key:
                key = None if grid.key is None else ("partial", grid.key)
                self._grid_key[name] = None if key is None else self._key_ids.setdefault(key, len(self._key_ids))
        return self._grids[name]

    def shard(self, param: str, box: Box) -> tuple[tuple[ReadItem, ...], tuple[Piece, ...]]:
        """The reads of `box` from `param`'s own source tensor, or the pieces of the tensors it is composed of
        (a `ShardPlan`'s `reads` and `pieces`)."""
        source = self.params[param][3]
        if source is not None:
            return (), pieces(source, box, lambda name, b: self.cover(name, b))
        return self.cover(param, box), ()

    def shards(self, param: str, boxes: tuple[Box, ...]) -> tuple[Sequence[tuple[ReadItem, ...]],
                                                                  Sequence[tuple[Piece, ...]]]:  # fmt: skip
        """`shard` of each of `boxes` as (reads per box, pieces per box). A layout group's boxes tuple is one
        object, so the covers of a plain tensor are looked up once per (grid key, boxes), not once per box."""
        kid = self._grid_key.get(param)
        if self.params[param][3] is not None or kid is None:
            done = [self.shard(param, box) for box in boxes]
            return [d[0] for d in done], [d[1] for d in done]
        key = (kid, id(boxes))
        hit = self._batches.get(key)
        if hit is None:  # the value keeps `boxes` alive, so its id is not reused while the key exists
            hit = self._batches[key] = (boxes, [self.cover(param, box) for box in boxes])
        return hit[1], repeat((), len(boxes))  # type: ignore[return-value]

    def cover(self, name: str, box: Box) -> tuple[ReadItem, ...]:
        """`coverage.cover` of `box` from the tensor `name`, computed once per (grid key, box)."""
        kid = self._grid_key.get(name)
        if kid is None:
            self.cover_calls += 1
            return cover(self.grid(name), box)
        key = (kid, box)
        reads = self._covers.get(key)
        if reads is None:
            self.cover_calls += 1
            reads = self._covers[key] = cover(self.grid(name), box)
        return reads




def merge_orders(orders: Sequence[Sequence[str]]) -> list[str]:
    """One order consistent with every rank file's order, so split-then-merge restores the original order.

    Each rank file keeps a subsequence of the original order (pipeline stages hold disjoint slices of it),
    so a topological merge of the per-file orders recovers it; ties go to the name seen first. If the files
    disagree (a cycle), the remaining names follow first appearance.
    """
    orders = list(dict.fromkeys(map(tuple, orders)))  # rank files of one stage list the same names: merge once
    if len(orders) == 1 and len(set(orders[0])) == len(orders[0]):
        return list(orders[0])  # one order (a complete source, or replicas only): as the merge below would give
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


_NONE: Mapping[str, TensorEntry] = {}


def full_shape(
    param: str, layout: ParamLayout, src_entries: Mapping[int, Mapping[str, TensorEntry]]
) -> tuple[tuple[int, ...], np.dtype]:
    """Infer the full shape from the first source rank holding `param` and check every other holder."""
    holders = [r for r in layout.rank_tuple if param in src_entries.get(r, _NONE)]
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
    shape = tuple(map(mul, first.shape, blocks))
    for rank in holders[1:]:
        entry = src_entries[rank][param]
        if entry.shape != first.shape or entry.dtype != first.dtype:
            raise FormatError(
                f"{entry.path}: parameter {param!r} on source rank {rank} is {entry.dtype}{list(entry.shape)} but "
                f"rank {holders[0]} has {first.dtype}{list(first.shape)}; the source layout does not match the files"
            )
    return shape, first.dtype
