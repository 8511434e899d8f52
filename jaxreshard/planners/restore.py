"""The restore planner: sources that restore whole arrays into any sharding themselves (orbax).

No byte ranges are planned: every parameter's source is `Restore(reader)`, and the executor asks the reader
for the array in the destination sharding, one parameter at a time.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..formats.writers import Flavour
from ..layout import COMPLETE
from ..plan import LayoutLike, ParamInfo, Plan, RankPlan, Restore, ShardPlan, dst_rank_list, rank_plans
from ..transforms import Cast
from .base import ArrayRequest, FileRequest


class RestorePlanner:
    """Plans rank files (`Planner`) and in-memory arrays (`ArrayPlanner`) from a restore-capable reader
    (`formats.orbax_io.OrbaxSource`: `params` and `restore(param, sharding, dtype)`)."""

    flavour: Flavour = "native"

    def __init__(self, reader, dst_layout: LayoutLike | None = None):  # noqa: ANN001 - a plan.Restorer with params
        self.reader, self.dst_layout = reader, dst_layout

    def params(self) -> list[str]:
        return list(self.reader.params)

    def full_shape(self, param: str) -> tuple[tuple[int, ...], np.dtype]:
        return self.reader.params[param]

    def plan(self, request: FileRequest) -> Plan:
        names = list(self.reader.params)
        dst = self.dst_layout.resolve(names) if self.dst_layout is not None else {n: COMPLETE for n in names}
        infos = {}
        for name in names:
            shape, dtype = self.reader.params[name]
            dst[name].check_shape(name, shape)
            infos[name] = ParamInfo(name, shape, dtype, COMPLETE, dst[name], Restore(self.reader))
        total = self.dst_layout.num_ranks if self.dst_layout is not None else 1
        wanted = dst_rank_list(request.dst_ranks, total)
        ranks = rank_plans(infos, wanted, request.prefix, request.suffix,
                           lambda name, boxes: [ShardPlan(name, box, ()) for box in boxes])
        return Plan(infos, ranks, {})

    def plan_arrays(self, wanted: Mapping[str, ArrayRequest]) -> Plan:
        infos = {}
        for param, want in wanted.items():
            shape, dtype = self.reader.params[want.src_param]
            casts = (Cast(want.dtype),) if want.dtype is not None and want.dtype != dtype else ()
            infos[param] = ParamInfo(want.src_param, shape, dtype, COMPLETE, COMPLETE, Restore(self.reader), casts)
        return Plan(infos, (RankPlan(0, "", ()),), {})
