"""One parameter's destination array: its boxes read, transformed and handed to `make_array_from_callback`.

Every needed box is read up front (few large reads, see fill.py) into 64-byte-aligned buffers that JAX aliases
instead of copying; the plan's per-box transforms (`transforms.py`) are applied to each box in order, one
function per transform type (`APPLY`). Shared by the rank-file executor (execute.py), `load` and the orbax
writer; only one parameter's boxes are alive at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from .box import Box
from .coverage import cover, source_grid
from .devices import make_mesh
from .errors import PlanError
from .fill import fill_boxes
from .formats.base import FileHandles, aligned_empty
from .formats.safetensors_io import FP8_DTYPES
from .plan import ParamInfo, Plan, Restore, ShardPlan
from .transforms import Cast, Dequantize, LoraFold, cast_box, dequantize_box, fold_box, scale_region

log = logging.getLogger(__name__)

Boxes = dict[Box, np.ndarray]


def read_boxes(plan: Plan, param: str, shards: dict[Box, ShardPlan], handles: FileHandles) -> Boxes:
    """Every box of `shards` read from the source and transformed: buffers of the destination dtype."""
    info = plan.params[param]
    bufs = {box: aligned_empty(box.shape, info.src_dtype) for box in shards}
    fill_boxes(plan, [(shard, bufs[box]) for box, shard in shards.items()], handles)
    return apply_transforms(param, info, bufs, handles)


def apply_transforms(param: str, info: ParamInfo, bufs: Boxes, handles: FileHandles) -> Boxes:
    for transform in info.transforms:
        bufs = APPLY[type(transform)](transform, param, bufs, handles)
    return bufs


def _apply_cast(cast: Cast, param: str, bufs: Boxes, handles: FileHandles) -> Boxes:
    return {box: buf if buf.dtype == cast.dtype else cast_box(buf, cast.dtype) for box, buf in bufs.items()}


def _apply_fold(fold: LoraFold, param: str, bufs: Boxes, handles: FileHandles) -> Boxes:
    a, b = (read_factor(fold.factors, factor, handles) for factor in (fold.a, fold.b))
    worst = max((fold_box(fold, param, box, buf, a, b) for box, buf in bufs.items()), default=0.0)
    log.info("merged LoRA %s into %s (scale %g): max |delta| %.6g", fold.module, param, fold.scaling, worst)
    return bufs


def _apply_dequantize(deq: Dequantize, param: str, bufs: Boxes, handles: FileHandles) -> Boxes:
    """Each box times its scales: only the scale blocks the box covers are read."""
    info = deq.scales.params[deq.scale]
    grid = source_grid(deq.scale, info.shape, info.src_layout, deq.scales.src_entries)
    out = {}
    for box, buf in bufs.items():
        region = scale_region(deq, box)
        scale = aligned_empty(region.shape, info.src_dtype)
        fill_boxes(deq.scales, [(ShardPlan(deq.scale, region, cover(grid, region)), scale)], handles)
        out[box] = dequantize_box(deq, box, buf, scale, region)
    return out


APPLY: dict[type, Callable[[Any, str, Boxes, FileHandles], Boxes]] = {
    Cast: _apply_cast, LoraFold: _apply_fold, Dequantize: _apply_dequantize,
}


def read_factor(factors: Plan, param: str, handles: FileHandles) -> np.ndarray:
    """One complete tensor of a plan of complete tensors (a LoRA factor), in its stored dtype."""
    info = factors.params[param]
    shard = next(s for r in factors.ranks for s in r.shards if s.param == param)
    buf = aligned_empty(info.shape, info.src_dtype)
    fill_boxes(factors, [(shard, buf)], handles)
    return buf


def jax_dtype(dtype: np.dtype) -> tuple[np.dtype, tuple[int, ...]]:
    """JAX canonicalises 64-bit types to 32 bits unless x64 is on: carry them as uint32 pairs instead, so
    bytes are never converted and the user's global `jax_enable_x64` setting is left alone."""
    if dtype.itemsize == 8:
        return np.dtype(np.uint32), (2,)
    if dtype in FP8_DTYPES:  # bytes only, as uint8, whatever FP8 types this JAX supports
        return np.dtype(np.uint8), ()
    return dtype, ()


def from_jax(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A shard's host data as `dtype` (undoing the uint32 pairs of `jax_dtype`)."""
    if dtype.itemsize == 8 and data.dtype != dtype:  # carried as uint32 pairs (restored arrays have the real dtype)
        return data.reshape(-1).view(dtype).reshape(data.shape[:-1])
    if dtype in FP8_DTYPES and data.dtype != dtype:  # FP8 carried as uint8
        return data.view(dtype)
    return data


def build_array(
    plan: Plan, param: str, shards: dict[Box, ShardPlan], sharding: Any, handles: FileHandles, *, native: bool = False
) -> Any:  # fmt: skip
    """The destination array of `param` in its destination dtype, on `sharding`.

    For rank files (`native=False`) 64-bit types are carried as uint32 pairs (`from_jax` undoes it); arrays
    handed to the user or to orbax (`native=True`) have the real dtype. A `Restore` source builds the array
    itself (in the source dtype for rank files: the executor casts each shard).
    """
    import jax

    info = plan.params[param]
    if isinstance(info.source, Restore):
        if any(isinstance(t, LoraFold) for t in info.transforms):
            raise PlanError(f"parameter {param!r}: a LoRA fold needs box reads, not a restored array")
        return info.source.reader.restore(info.param, sharding, info.dst_dtype if native else info.src_dtype)
    bufs = read_boxes(plan, param, shards, handles)
    dtype = info.dst_dtype
    carried, tail = (dtype, ()) if native else jax_dtype(dtype)

    def callback(index: Any) -> np.ndarray:  # a tuple of slices (jax types it `Index | None`)
        box = Box.from_index(index[: len(info.shape)], info.shape)
        buf = bufs.get(box)
        if buf is None:  # a box no planned rank needs (with --ranks): untouched memory, never written out
            buf = bufs[box] = aligned_empty(box.shape, dtype)
        if tail:
            return buf.reshape(-1).view(carried).reshape(buf.shape + tail)
        return buf.view(carried) if carried != dtype else buf

    return jax.make_array_from_callback(info.shape + tail, sharding, callback, dtype=carried)



def build_arrays(plan: Plan, sink: Callable[[str, Any], None], devices: list[Any]) -> None:
    """Every parameter of `plan` as one array on its destination mesh, in order, handed to `sink(param, array)`
    (an array writer such as orbax's): the boxes of the plan's ranks are read once each."""
    from jax.sharding import NamedSharding

    boxes: dict[str, dict[Box, ShardPlan]] = {}
    for rank in plan.ranks:
        for shard in rank.shards:
            boxes.setdefault(shard.param, {})[shard.dst_box] = shard
    with FileHandles() as handles:
        for param, info in plan.params.items():
            sharding = NamedSharding(make_mesh(info.dst_layout, devices), info.dst_layout.partition_spec())
            sink(param, build_array(plan, param, boxes.get(param, {}), sharding, handles, native=True))
