"""The MindSpore planner: strategies on both sides with `mindspore.transform_checkpoints` semantics.

A thin adapter over `jaxreshard.mindspore.plan_mindspore` (the MindSpore wing), which decides which
parameters each rank file gets, in MindSpore's order, and which are copied verbatim (`PerRankCopy`) or as
text records (`TextRecord`). Chosen when a strategy is given and no side is a native layout.
"""

from __future__ import annotations

from ..formats import SourceCheckpoint
from ..formats.mindspore_strategy import Strategy
from ..formats.writers import Flavour
from ..mindspore import StrategyLayout, plan_mindspore
from ..plan import Plan
from ..srccheck import check_given_layout, source_manifest
from .base import FileRequest


class MindSporePlanner:
    """Plans rank files that equal what `transform_checkpoints` writes (`Planner`)."""

    flavour: Flavour = "mindspore"

    def __init__(self, source: SourceCheckpoint, src: Strategy | None, dst: Strategy | None, *,
                 exact_replicas: bool = False):  # fmt: skip
        self.source, self.src, self.dst, self.exact_replicas = source, src, dst, exact_replicas
        manifest = source_manifest(source)  # sizes checked on every read; a given strategy checked against it
        if src is not None:
            ndims = {p: len(shape) for p, shape in source.shapes.items()}
            check_given_layout(source, StrategyLayout(src, ndims), manifest)

    def plan(self, request: FileRequest) -> Plan:
        return plan_mindspore(self.source, self.src, self.dst, prefix=request.prefix, suffix=request.suffix,
                              dst_ranks=request.dst_ranks, exact_replicas=self.exact_replicas)
