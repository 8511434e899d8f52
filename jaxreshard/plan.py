"""The plan: for every destination rank and parameter, which box of which source file feeds which region.

Computed from headers and layouts alone, before any tensor byte is read, and checked: every destination box
is covered exactly once by source regions. The plan is plain frozen data, so `jaxreshard plan` can print it
and the executor only follows it (mergekit's planner/executor split, DCP's `ReadItem` box vocabulary).

Everything special is a type, not a flag: each parameter has a typed source (`BoxReads`, `PerRankCopy`,
`Restore`) and a tuple of typed per-box transforms (transforms.py: `Cast`, `LoraFold`); text entries copied
into rank files are `TextRecord`s. The executor dispatches once per type (execute.WRITE, arrays.APPLY).
What the source holds (its parameters' order and shapes, what transform rules make of them, how a box is
covered) is read in paramsources.py.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import repeat
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes
import numpy as np

from .box import Box
from .composed import Composed, Piece
from .coverage import ReadItem
from .errors import PlanError
from .formats.base import TensorEntry
from .layout import COMPLETE, ParamLayout
from .paramsources import ParamSources, full_shape, merge_orders
from .rankgroups import layout_groups, per_rank
from .rulemap import apply_rules
from .rules import Rules
from .transforms import Cast, Transform


class LayoutLike(Protocol):
    """A native `Layout`, or an adapter (MindSpore strategy) that resolves names the same way."""

    @property
    def num_ranks(self) -> int: ...

    def resolve(self, params: Iterable[str]) -> dict[str, ParamLayout]: ...


@dataclass(frozen=True)
class Resolved:
    """A layout with its parameters already resolved (over all names at once): resolving them again, or a
    subset, is a lookup. Names it has not seen are resolved by the layout itself."""

    layout: LayoutLike
    layouts: Mapping[str, ParamLayout] = field(repr=False)

    @property
    def num_ranks(self) -> int:
        return self.layout.num_ranks

    def resolve(self, params: Iterable[str]) -> dict[str, ParamLayout]:
        names = list(params)
        if not all(map(self.layouts.__contains__, names)):
            return self.layout.resolve(names)
        return dict(zip(names, map(self.layouts.__getitem__, names)))


class Restorer(Protocol):
    """A reader that restores whole arrays straight into any sharding itself (orbax_io.OrbaxSource)."""

    def restore(self, param: str, sharding: Any, dtype: np.dtype) -> Any: ...


@dataclass(frozen=True, slots=True)
class BoxReads:
    """The parameter is one sharded array: each destination box is read from the source regions its
    `ShardPlan.reads` list."""


@dataclass(frozen=True, slots=True)
class PerRankCopy:
    """Box reads written rank by rank without JAX: per-rank copies that are not one sharded array (MindSpore
    pass-through copies, a shared parameter laid out differently per pipeline stage)."""


@dataclass(frozen=True, slots=True)
class Restore:
    """The source restores the parameter itself, in any sharding (no byte ranges; orbax)."""

    reader: Restorer = field(compare=False)


Source = BoxReads | PerRankCopy | Restore | Composed
READS, COPY = BoxReads(), PerRankCopy()


@dataclass(frozen=True, slots=True)
class ParamInfo:
    param: str
    shape: tuple[int, ...]
    src_dtype: np.dtype
    src_layout: ParamLayout
    dst_layout: ParamLayout
    source: Source = READS
    transforms: tuple[Transform, ...] = ()  # applied in order to every destination box after it is read

    @property
    def dst_dtype(self) -> np.dtype:
        """The stored dtype: the last `Cast`'s, else the source's."""
        return next((t.dtype for t in reversed(self.transforms) if isinstance(t, Cast)), self.src_dtype)

    @property
    def direct(self) -> bool:
        """Written rank by rank (`PerRankCopy`); the name older callers used."""
        return isinstance(self.source, PerRankCopy)


@dataclass(frozen=True, slots=True)
class ShardPlan:
    param: str
    dst_box: Box
    reads: tuple[ReadItem, ...]  # from `param`'s own source tensor
    pieces: tuple[Piece, ...] = ()  # a `Composed` parameter: regions of other source tensors

    def source_reads(self) -> Iterator[tuple[str, ReadItem]]:
        """Every read of this box with the source tensor it reads from."""
        yield from ((self.param, item) for item in self.reads)
        for piece in self.pieces:
            yield from ((piece.part.src_param, item) for item in piece.reads)


@dataclass(frozen=True, slots=True)
class TextRecord:
    """A text entry (MindSpore `str` record) copied into a rank file as it is."""

    param: str
    value: str


@dataclass(frozen=True, slots=True)
class RankPlan:
    dst_rank: int
    dst_file: str  # relative to the destination directory
    shards: tuple[ShardPlan, ...]
    texts: tuple[TextRecord, ...] = ()
    order: tuple[str, ...] = ()  # output order of shards and texts when it matters (empty: shards, then texts)


@dataclass(frozen=True)
class Plan:
    params: dict[str, ParamInfo]  # in output order
    ranks: tuple[RankPlan, ...]
    src_entries: Mapping[int, Mapping[str, TensorEntry]] = field(repr=False)

    def src_path(self, read: ReadItem, param: str) -> Path:
        return self.src_entries[read.src_rank][param].path


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: planning a 90k-tensor checkpoint makes about a million long-lived
    objects and no reference cycles, which the collector would otherwise rescan many times over (a third of the
    planning time). It resumes, as it was, on the way out."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@gc_paused()
def make_plan(
    src_entries: Mapping[int, Mapping[str, TensorEntry]],
    src_layout: LayoutLike | None,
    dst_layout: LayoutLike | None,
    *,
    prefix: str = "checkpoint_",
    suffix: str = ".safetensors",
    dst_ranks: Iterable[int] | None = None,
    strict: bool = True,
    rules: Rules | None = None,
    reverse: bool = False,
    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> Plan:
    """Plan a conversion; raises `PlanError`/`LayoutError`/`FormatError` before anything is written.

    `src_entries` maps each global source rank to its tensors (one rank, 0, for a complete source);
    `None` layouts mean complete. `dst_ranks` restricts the plan to some destination ranks. `strict=False`
    accepts rank files that lack parameters a replica holds (checkpoints saved with redundancy removed).
    `rules` (transforms, applied `reverse`d if asked) rename and compose source tensors: the destination layout
    speaks of the transformed names and shapes. `shapes`: the full shape and dtype of every source tensor, when
    the caller has them already (`full_shape` of each).
    """
    names = merge_orders([list(src_entries[rank]) for rank in sorted(src_entries)])
    src_params = src_layout.resolve(names) if src_layout is not None else {p: COMPLETE for p in names}
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
    if shapes is None or not all(map(shapes.__contains__, names)):
        shapes = {p: full_shape(p, src_params[p], src_entries) for p in names}
    targets = apply_rules(rules, names, shapes, reverse) if rules is not None else None
    sources = ParamSources(names, shapes, src_params, src_entries, targets, strict)
    dst_params = dst_layout.resolve(list(sources.params)) if dst_layout is not None else \
        {p: COMPLETE for p in sources.params}  # fmt: skip
    infos = param_infos(sources, dst_params)
    dst_total = dst_layout.num_ranks if dst_layout is not None else 1
    wanted = dst_rank_list(dst_ranks, dst_total)

    def shards(param: str, boxes: tuple[Box, ...]) -> list[ShardPlan]:  # replicas share one per box (read once)
        reads, pieces = sources.shards(param, boxes)
        return list(map(ShardPlan, repeat(param), boxes, reads, pieces))

    ranks = rank_plans(infos, wanted, prefix, suffix, shards)
    return Plan(infos, ranks, sources.entries)


def param_infos(sources: ParamSources, dst_params: Mapping[str, ParamLayout]) -> dict[str, ParamInfo]:
    """Every destination parameter's `ParamInfo`, its shape checked against its destination layout (once per
    distinct shape and layout: the check is pure in them)."""
    infos = {}
    checked: set[tuple[tuple[int, ...], ParamLayout]] = set()
    for param, (shape, dtype, layout, composed) in sources.params.items():
        if (shape, dst_params[param]) not in checked:
            dst_params[param].check_shape(param, shape)
            checked.add((shape, dst_params[param]))
        source = READS if composed is None else composed
        infos[param] = ParamInfo(param, shape, dtype, layout, dst_params[param], source=source)
    return infos


def dst_rank_list(dst_ranks: Iterable[int] | None, total: int, what: str = "layout") -> list[int]:
    """The destination ranks to write: all, or the requested ones (which must exist)."""
    wanted = list(range(total)) if dst_ranks is None else sorted(set(dst_ranks))
    bad = [r for r in wanted if not 0 <= r < total]
    if bad:
        raise PlanError(f"destination ranks {bad} do not exist; the destination {what} has ranks 0-{total - 1}")
    return wanted


def rank_plans(
    infos: Mapping[str, ParamInfo], ranks: Iterable[int], prefix: str, suffix: str,
    shards: Callable[[str, tuple[Box, ...]], Sequence[ShardPlan]],
) -> tuple[RankPlan, ...]:  # fmt: skip
    """Per destination rank, the shard of every parameter its pipeline stage holds, in parameter order.

    Planned per layout, not per parameter x rank (rankgroups.py): parameters of one shape and destination layout
    form a group whose boxes are computed once; `shards(param, boxes)` is called once per parameter with the
    distinct boxes the wanted ranks hold of it, one `ShardPlan` per box; and ranks that hold the same boxes of
    every group (data-parallel replicas) share one tuple of shards.
    """
    wanted = list(ranks)
    groups, group_of = layout_groups([(info.shape, info.dst_layout) for info in infos.values()], wanted)
    tables = [shards(param, groups[g].boxes) if groups[g].boxes else () for param, g in zip(infos, group_of)]
    return tuple(RankPlan(rank, f"rank_{rank}/{prefix}{rank}{suffix}", held)
                 for rank, held in per_rank(groups, group_of, tables, wanted))


def with_dtype(plan: Plan, dtype: np.dtype | None) -> Plan:
    """The plan with floating-point parameters cast to `dtype` on write (integers and bools untouched)."""
    if dtype is None:
        return plan
    cast = Cast(np.dtype(dtype))
    params = {p: replace(i, transforms=(*i.transforms, cast)) if is_floating(i.src_dtype) else i
              for p, i in plan.params.items()}
    return replace(plan, params=params)


def is_floating(dtype: np.dtype) -> bool:
    """Floating point, bfloat16 included (ml_dtypes types are not np.floating subtypes); FP8 is not: its bytes
    are carried, never cast (`--dequantize` turns it into a float)."""
    return (dtype.kind == "f" and dtype.itemsize > 1) or dtype == np.dtype(ml_dtypes.bfloat16)


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
