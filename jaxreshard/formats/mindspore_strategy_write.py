"""Writing MindSpore strategy files (per-stage and merged-pipeline) with the bytes MindSpore's own writer makes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .mindspore_strategy import ParamStrategy
from .mindspore_strategy_proto import ParallelStrategyMap


def _add_layout(message: Any, name: str, p: ParamStrategy) -> None:
    """Fill one ParallelLayoutItem as MindSpore's C++ writer does: every field present, one DevMatrix, one
    TensorMap (or one per dim plus a trailing empty one for a 1-D multi-axis map), empty split shape/offsets."""
    layouts = message.parallel_layout_item.add(param_name=name).parallel_layouts
    layouts.dev_matrix.add().dim.extend(p.dev_matrix)
    if any(isinstance(e, tuple) for e in p.tensor_map):
        for e in p.tensor_map:
            layouts.tensor_map.add().dim.extend(e if isinstance(e, tuple) else (e,))
        if len(p.tensor_map) == 1:
            layouts.tensor_map.add()
    else:
        layouts.tensor_map.add().dim.extend(p.tensor_map)
    layouts.param_split_shape.add()
    layouts.indices_offset.add()
    layouts.field, layouts.opt_weight_shard_step, layouts.opt_weight_shard_size = 0, p.opt_shard_step, p.opt_shard_size


def strategy_bytes(stages: Mapping[int, Mapping[str, ParamStrategy]], *, merged: bool) -> bytes:
    """A serialized ParallelStrategyMap holding `stages[s]`, stage s's layouts, with one strategy item per stage
    carrying `s`. Merged names every layout `"<stage>-<name>"`, as merge_pipeline_strategys does."""
    message = ParallelStrategyMap(current_stage=1)
    for stage, params in stages.items():
        message.parallel_strategy_item.add(node_name=f"jaxreshard/stage{stage}").parallel_strategys.stage = stage
        for name, p in params.items():
            _add_layout(message, f"{stage}-{name}" if merged else name, p)
    return message.SerializeToString()


def write_strategy_file(path: Path, params: Mapping[str, ParamStrategy], stage: int = 0) -> None:
    """One stage's strategy file, like the `ckpt_strategy_rank_x.ckpt` a training job saves."""
    Path(path).write_bytes(strategy_bytes({stage: params}, merged=False))


def write_merged_strategy_file(path: Path, stages: Sequence[Mapping[str, ParamStrategy]]) -> None:
    """A merged pipeline strategy (what `merge_pipeline_strategys` writes); `stages[s]` = stage s's layouts."""
    Path(path).write_bytes(strategy_bytes(dict(enumerate(stages)), merged=True))
