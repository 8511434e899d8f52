"""The native planner: layouts with jaxreshard's semantics over rank files of any format.

Both sides may be native layouts or MindSpore strategies read as layouts (parameters outside a strategy are
replicated). Text entries of the source (MindSpore `str` records) go to every rank, as MindSpore's
pass-through does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from .. import fp8
from ..box import Box
from ..coverage import cover, source_grid
from ..errors import ConfigError
from ..formats import SourceCheckpoint
from ..formats.writers import Flavour
from ..layout import COMPLETE, ParamLayout
from ..paramsources import ParamSources
from ..plan import (
    READS,
    LayoutLike,
    ParamInfo,
    Plan,
    RankPlan,
    Resolved,
    ShardPlan,
    TextRecord,
    full_shape,
    gc_paused,
    make_plan,
    merge_orders,
)
from ..rulemap import apply_rules, recorded_order
from ..rules import Rules
from ..srccheck import source_layout
from ..transforms import Cast
from .base import ArrayRequest, FileRequest
from .sides import LayoutArg, Side, as_layout, one_side, read_side


class NativePlanner:
    """Plans rank files (`Planner`) and in-memory arrays (`ArrayPlanner`) with native semantics.

    `renamed` adds output names (new -> stored) whose tensor rank is the stored parameter's (merge-lora's
    `X.base_layer.weight` -> `X.weight`).
    """

    flavour: Flavour = "native"

    def __init__(self, source: SourceCheckpoint, src: Side, dst: Side = None, *,
                 renamed: Mapping[str, str] | None = None, rules: Rules | None = None,
                 reverse: bool = False):  # fmt: skip
        ndims = {p: len(shape) for p, shape in source.shapes.items()}
        ndims.update({new: ndims[old] for new, old in (renamed or {}).items() if old in ndims})
        self.source = source
        if rules is not None and reverse:  # reversed names go back to the places a forward conversion recorded
            rules = replace(rules, order=recorded_order(source.metadata, str(source.path)))
        self.rules, self.reverse = rules, reverse
        # block scales are laid out with their weights (a manifest records them so)
        scaled = bool(fp8.scale_pairs(ndims))
        src_layout = as_layout(src, ndims)
        self.src_layout: LayoutLike | None = source_layout(source, fp8.following(src_layout) if scaled else src_layout)
        self._resolved: dict[str, ParamLayout] | None = None
        self._names: list[str] | None = None
        self._dst_resolved: dict[str, ParamLayout] | None = None
        self._shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._sources: ParamSources | None = None
        if source.distributed and self.src_layout is None:
            raise ConfigError(
                f"{source.path}: this is a distributed checkpoint ({len(source.entries)} rank folders); pass the "
                "layout it was saved with (--src-layout / src_layout=, or --src-strategy / src_strategy=)"
            )
        if rules is not None:  # the destination layout speaks of the transformed names and shapes
            ndims = {p: len(shape) for p, (shape, *_) in self.transformed().params.items()}
        dst_layout = as_layout(dst, ndims)
        self.dst_layout: LayoutLike | None = fp8.following(dst_layout) if fp8.scale_pairs(ndims) else dst_layout

    def transformed(self) -> ParamSources:
        """Every destination tensor of the transform rules and where its bytes come from (once)."""
        if self._sources is None:
            names, layouts = self._src_names(), self._src_params()
            shapes = self._src_shapes()
            targets = apply_rules(self.rules, names, shapes, self.reverse) if self.rules is not None else None
            self._sources = ParamSources(names, shapes, layouts, self.source.entries, targets)
        return self._sources

    @gc_paused()
    def plan(self, request: FileRequest) -> Plan:
        source = self.source
        self._check_scales()
        resolved = self._dst_params()
        dst = None if self.dst_layout is None or resolved is None else Resolved(self.dst_layout, resolved)
        plan = make_plan(source.entries, self.src_layout, dst, prefix=request.prefix,
                         suffix=request.suffix, dst_ranks=request.dst_ranks, rules=self.rules, reverse=self.reverse,
                         shapes=self._src_shapes())
        texts = tuple(TextRecord(k, v) for k, v in source.extras.get(min(source.entries), {}).items())
        if texts:
            plan = replace(plan, ranks=tuple(replace(r, texts=texts) for r in plan.ranks))
        return plan

    def _check_scales(self) -> None:
        """FP8 block scales: each fits its weight, and no layout cuts a scale block (before planning, so the
        error names the weight rather than its scale's uneven split)."""
        pairs = fp8.scale_pairs(self.params())
        if not pairs:
            return
        block = fp8.block_size(self.source.root)
        dst = self._dst_params() or {}
        src = self._src_params()
        checked: set[tuple[object, ...]] = set()  # the check is pure in these, so once per distinct case
        for scale, weight in pairs.items():
            layouts = {"source": src[weight], "destination": dst.get(weight, COMPLETE)}
            shape, scale_shape = self.full_shape(weight)[0], self.full_shape(scale)[0]
            case = (shape, scale_shape, layouts["source"], layouts["destination"])
            if case not in checked:
                fp8.check_scale_blocks(scale, weight, shape, scale_shape, layouts, block)
                checked.add(case)

    def _dst_params(self) -> dict[str, ParamLayout] | None:
        """Every destination parameter's layout, resolved over all names at once, once (None: complete)."""
        if self._dst_resolved is None and self.dst_layout is not None:
            self._dst_resolved = self.dst_layout.resolve(self.params())
        return self._dst_resolved

    def params(self) -> list[str]:
        """The parameters a load can ask for: the transformed names under transform rules."""
        return list(self.transformed().params) if self.rules is not None else self._src_names()

    def _src_names(self) -> list[str]:
        """The source's parameter names in order (merged once; a copy each call)."""
        if self._names is None:
            self._names = merge_orders([list(self.source.entries[r]) for r in sorted(self.source.entries)])
        return list(self._names)

    def _src_params(self) -> dict[str, ParamLayout]:
        """Every source parameter's layout, resolved over all names at once (a layout's stages may depend on
        the whole set, e.g. layer indices), once."""
        if self._resolved is None:
            names = self._src_names()
            self._resolved = self.src_layout.resolve(names) if self.src_layout is not None else \
                {n: COMPLETE for n in names}  # fmt: skip
        return self._resolved

    def src_layouts(self) -> dict[str, ParamLayout]:
        """Every source parameter's layout (resolved once)."""
        return dict(self._src_params())

    def full_shape(self, param: str) -> tuple[tuple[int, ...], np.dtype]:
        if self.rules is not None:
            shape, dtype, *_ = self.transformed().params[param]
            return shape, dtype
        if param not in self._shapes:  # one at a time: a load asks for a few tensors of a large checkpoint
            self._shapes[param] = full_shape(param, self._src_params()[param], self.source.entries)
        return self._shapes[param]

    def _src_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every source tensor's full shape and dtype (checked across its holders), each computed once."""
        layouts, entries, shapes, names = self._src_params(), self.source.entries, self._shapes, self._src_names()
        for p in names:
            if p not in shapes:
                shapes[p] = full_shape(p, layouts[p], entries)
        return {p: shapes[p] for p in names}

    def plan_arrays(self, wanted: Mapping[str, ArrayRequest]) -> Plan:
        if self.rules is not None:
            return self._plan_transformed(wanted)
        layouts = self._src_params()
        view = {r: {p: e[w.src_param] for p, w in wanted.items() if w.src_param in e}
                for r, e in self.source.entries.items()}
        infos, shards = {}, []
        for param, want in wanted.items():
            shape, dtype = full_shape(want.src_param, layouts[want.src_param], self.source.entries)
            casts = (Cast(want.dtype),) if want.dtype is not None and want.dtype != dtype else ()
            infos[param] = ParamInfo(want.src_param, shape, dtype, layouts[want.src_param], COMPLETE, transforms=casts)
            grid = source_grid(param, shape, infos[param].src_layout, view)
            shards += [ShardPlan(param, box, cover(grid, box)) for box in dict.fromkeys(want.boxes)]
        return Plan(infos, (RankPlan(0, "", tuple(shards)),), view)

    def _plan_transformed(self, wanted: Mapping[str, ArrayRequest]) -> Plan:
        """`plan_arrays` under transform rules: plain tensors read as they are stored (relabelled to the
        target's names), composed ones piece by piece from their source tensors."""
        sources = self.transformed()
        view = {r: dict(e) for r, e in sources.entries.items()}
        infos, shards = {}, []
        for param, want in wanted.items():
            shape, dtype, layout, composed = sources.params[want.src_param]
            casts = (Cast(want.dtype),) if want.dtype is not None and want.dtype != dtype else ()
            source = READS if composed is None else composed
            infos[param] = ParamInfo(want.src_param, shape, dtype, layout, COMPLETE, source=source, transforms=casts)
            shards += [ShardPlan(param, box, *sources.shard(want.src_param, box)) for box in dict.fromkeys(want.boxes)]
            if composed is None and param != want.src_param:
                for r, e in sources.entries.items():
                    if want.src_param in e:
                        view[r][param] = e[want.src_param]
        return Plan(infos, (RankPlan(0, "", tuple(shards)),), view)


def boxes_of(sharding: object, shape: tuple[int, ...]) -> list[Box]:
    """The boxes this process's devices hold under `sharding` (pure metadata, no device memory)."""
    return [Box.from_index(index, shape) for index in sharding.addressable_devices_indices_map(shape).values()]  # type: ignore[attr-defined]


def native_layouts(
    source: SourceCheckpoint, src_layout: LayoutArg, src_strategy: Any = None, dst_layout: LayoutArg = None,
    dst_strategy: Any = None, *, renamed: Mapping[str, str] | None = None,
) -> tuple[LayoutLike | None, LayoutLike | None]:  # fmt: skip
    """Source and destination layouts with native semantics (strategies read as layouts; the `*_strategy`
    arguments are aliases of the `*_layout` ones); `renamed` adds output names (new -> stored)."""
    src, dst = one_side(src_layout, src_strategy, "src"), one_side(dst_layout, dst_strategy, "dst")
    planner = NativePlanner(source, read_side(src), read_side(dst), renamed=renamed)
    return planner.src_layout, planner.dst_layout
