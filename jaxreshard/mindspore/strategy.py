"""MindSpore strategies as layouts: each parameter's (dev_matrix, tensor_map, optimizer shard) as a mesh + spec.

MindSpore describes a parameter's sharding by a device matrix counted from the right, a tensor map, and an
optimizer ("ZeRO") shard that splits dim 0 again over replicated axes. MindSpore itself first *expands* this
into a layout without optimizer shard or multi-axis entries over a reshaped tensor F', and its
transform is a pure data movement on F'. `expanded_layout` ports that expansion line by line, quirks
included (the simple optimizer-shard case rebuilds the device matrix in tensor-dimension order); because F'
only splits dims into C-order sub-dims, the expanded layout is exactly a mesh (one axis per device-matrix
entry, `d0` major) plus a PartitionSpec over the original dims, which is what the rest of jaxreshard uses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import cast

from ..errors import LayoutError
from ..formats.mindspore_strategy import ParamStrategy, Strategy, TensorMapEntry
from ..layout import ParamLayout


def tensor_strategy(dev_matrix: Sequence[int], tensor_map: Sequence[TensorMapEntry]) -> list[int]:
    """Number of slices per tensor dim (`_get_tensor_strategy`)."""
    out = []
    for dim in tensor_map:
        if isinstance(dim, tuple):
            out.append(math.prod(dev_matrix[len(dev_matrix) - i - 1] for i in dim if i != -1))
        else:
            out.append(1 if dim == -1 else dev_matrix[-dim - 1])
    return out


def opt_shard_size(p: ParamStrategy) -> int:
    """The optimizer shard size with -1 resolved to the whole replicated group (`_extract_layout_item`)."""
    if p.opt_shard_size == -1:
        return math.prod(p.dev_matrix) // math.prod(tensor_strategy(p.dev_matrix, p.tensor_map))
    return p.opt_shard_size


def _expand_multi_axis(dev: list[int], tmap: list, shape: list[int]) -> tuple[list[int], list, list[int]]:
    """`_expand_layout`: a dim mapped to axes [a1..ak] becomes k sub-dims, a1 major."""
    new_map, new_shape = [], []
    for index, dim in enumerate(tmap):
        if isinstance(dim, (tuple, list)):
            accu = 1
            for axis in dim[:-1]:
                new_map.append(axis)
                new_shape.append(dev[len(dev) - 1 - axis])
                accu *= dev[len(dev) - 1 - axis]
            new_map.append(dim[-1])
            new_shape.append(shape[index] // accu)
        else:
            new_map.append(dim)
            new_shape.append(shape[index])
    return dev, new_map, new_shape


def _opt_helper(dev: list[int], tmap: list, size: int, shape: list[int], ts: list[int], repeated: list[int]):
    """`_construct_tensor_layout_helper`: consume `size` from the replicated axes, right to left."""
    new_dev, dev_map = list(dev), list(range(len(dev)))
    opt_dims: list[int] = []
    remaining = size if size != -1 else math.prod(dev[i] for i in repeated)
    for dim in repeated[::-1]:
        part = dev[dim]
        if remaining // part == 0:
            if part % remaining:
                raise LayoutError(f"dev_matrix value {dev[dim]} cannot be divided by optimizer shard size {remaining}")
            part = remaining
            new_dev[dim] = dev[dim] // part
            new_dev.insert(dim + 1, part)
            for i in range(len(dev) - dim - 1, len(dev)):
                dev_map[i] += 1
        if remaining % part:
            raise LayoutError(f"optimizer shard size {remaining} cannot be divided by device axis size {part}")
        remaining //= part
        opt_dims.insert(0, dim)
        if remaining == 1:
            break
    new_map = list(tmap)
    if len(new_dev) != len(dev):
        opt_dims = [d + 1 for d in opt_dims]
        for index, item in enumerate(new_map):
            if isinstance(item, (tuple, list)):
                new_map[index] = [dev_map[x] if x >= 0 else x for x in item]
            elif item >= 0:
                new_map[index] = dev_map[item]
    new_shape = list(shape)
    new_shape[0] = ts[0]
    first = shape[0] // ts[0]
    accu = 1
    for i in range(len(opt_dims) - 1):
        new_shape.insert(i + 1, new_dev[opt_dims[i]])
        accu *= new_dev[opt_dims[i]]
    new_shape.insert(len(opt_dims), first // accu)
    for index, r_dim in enumerate(opt_dims):
        new_map.insert(index + 1, len(new_dev) - r_dim - 1)
    return new_dev, new_map, new_shape


def expanded_layout(p: ParamStrategy, shape: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """`_construct_tensor_layout_for_opt_shard` (after `_extract_layout_item`): (D', M', F')."""
    dev, tmap, shape = list(p.dev_matrix), [list(t) if isinstance(t, tuple) else t for t in p.tensor_map], list(shape)
    step, size = p.opt_shard_step, opt_shard_size(p)
    has_layout = any(isinstance(t, list) for t in tmap)
    no_opt = step == 0 or size == 0
    if not no_opt and not shape:
        raise LayoutError(f"an optimizer shard (step {step}, size {size}) on a 0-dim tensor: "
                          "there is no dim 0 to split")
    ts = tensor_strategy(p.dev_matrix, p.tensor_map)
    if has_layout:
        if no_opt:
            return _expand_multi_axis(dev, tmap, shape)
        _, flat, _ = _expand_multi_axis(dev, tmap, shape)
        sharded = {len(dev) - d - 1 for d in flat if d != -1}
        repeated = [i for i, v in enumerate(dev) if i not in sharded and v > 1]
        if not repeated:
            raise LayoutError(f"device matrix {dev} and tensor map {tmap} leave no axis for the optimizer shard")
        return _expand_multi_axis(*_opt_helper(dev, tmap, size, shape, ts, repeated))
    one_axis = cast(list[int], tmap)  # no multi-axis (list) entry past the branch above
    if no_opt:
        return dev, one_axis, shape
    sharded = {len(dev) - d - 1 for d in one_axis if d != -1}
    repeated = [i for i, v in enumerate(dev) if i not in sharded and v > 1]
    if not repeated:
        raise LayoutError(f"device matrix {dev} and tensor map {tmap} leave no axis for the optimizer shard")
    if len(repeated) == 1 and math.prod(dev[repeated[0] + 1 :]) != step:
        raise LayoutError(f"optimizer shard step {step} differs from the model-parallel size "
                          f"{math.prod(dev[repeated[0] + 1:])}")
    if 1 < len(repeated) < len(dev) or repeated[0] > 0:
        return _opt_helper(dev, tmap, size, shape, ts, repeated)
    full = list(shape)
    full[0] = ts[0]
    full.insert(1, shape[0] // ts[0])
    new_map = [-1 if v == 1 else len(ts) - 1 - i for i, v in enumerate(ts)]
    new_map.insert(1, len(ts))
    new_dev = [size, *ts]
    repeat = math.prod(dev) // (step * size)
    if repeat > 1:
        new_dev.insert(0, repeat)
    return new_dev, new_map, full


@functools.lru_cache(maxsize=4096)  # planners ask again for every destination rank; the answer never changes
def param_layout(name: str, p: ParamStrategy, ndim: int, stages: tuple[int, ...], source: str = "") -> ParamLayout:
    """The mesh + spec equivalent of MindSpore's expanded layout of one parameter with `ndim` dims."""
    if len(p.tensor_map) != ndim:
        raise LayoutError(
            f"{source}: parameter {name!r} has {ndim} dims but its strategy tensor_map {list(p.tensor_map)} has "
            f"{len(p.tensor_map)}; the strategy does not belong to this checkpoint"
        )
    big = max(math.prod(p.dev_matrix), 1) ** 2 * 64  # a placeholder size every split divides
    try:
        dev, tmap, sub_shape = expanded_layout(p, [big] * ndim)
    except LayoutError as e:  # name the file and the parameter the expansion failed for
        raise LayoutError(f"{source}: parameter {name!r}: {e}") from None
    names = tuple(f"d{j}" for j in range(len(dev)))
    spec: list[tuple[str, ...]] = []
    k = 0
    for _ in range(ndim):  # group F' sub-dims back into the original dims (C-order reshape)
        axes: list[str] = []
        product = 1
        while product < big:
            size, m = sub_shape[k], tmap[k]
            last = product * size >= big
            if m != -1:
                axis = len(dev) - 1 - m
                if not last and size != dev[axis]:
                    raise LayoutError(f"{source}: parameter {name!r}: layout {p} is not a regular block split")
                axes.append(names[axis])
            elif not last and size != 1:
                raise LayoutError(f"{source}: parameter {name!r}: layout {p} is not a regular block split")
            product *= size
            k += 1
        spec.append(tuple(axes))
    return ParamLayout(tuple(zip(names, dev)), tuple(spec), stages)


@dataclass(frozen=True)
class StrategyLayout:
    """A MindSpore strategy as a jaxreshard layout (`resolve` + `num_ranks`), for the native planner.

    Parameters outside the strategy are replicated on every rank (native semantics); the MindSpore-exact
    pass-through rules live in `mindspore.py`. Tensor ranks come from `ndims` (taken from the checkpoint).
    """

    strategy: Strategy
    ndims: dict[str, int]

    @property
    def num_ranks(self) -> int:
        return self.strategy.stage_device_num * self.strategy.stage_num

    def resolve(self, params: Iterable[str]) -> dict[str, ParamLayout]:
        out = {}
        n = self.strategy.stage_device_num
        for param in params:
            p = self.strategy.params.get(param)
            if p is None:
                out[param] = ParamLayout((("d0", n),), (), tuple(range(self.strategy.stage_num)))
            else:
                out[param] = param_layout(param, p, self.ndims[param], p.stages, self.strategy.source)
        return out


def to_param_strategy(layout: ParamLayout) -> ParamStrategy:
    """A native layout as MindSpore writes it: the mesh is the device matrix, axes counted from the right."""
    names = layout.axis_names
    index = {name: len(names) - 1 - j for j, name in enumerate(names)}
    tmap: list[TensorMapEntry] = []
    for axes in layout.spec:
        if not axes:
            tmap.append(-1)
        else:
            tmap.append(index[axes[0]] if len(axes) == 1 else tuple(index[a] for a in axes))
    return ParamStrategy(layout.mesh_shape or (1,), tuple(tmap), 0, 0, layout.stages)


def strategies_by_stage(params: dict[str, ParamLayout], shapes: dict[str, tuple[int, ...]],
                        num_stages: int) -> list[dict[str, ParamStrategy]]:
    """Per pipeline stage, the strategy entries of the parameters it holds (spec padded to the tensor rank)."""
    stages: list[dict[str, ParamStrategy]] = [{} for _ in range(num_stages)]
    for name, layout in params.items():
        layout.check_shape(name, shapes[name])
        padded = replace(layout, spec=layout.spec + ((),) * (len(shapes[name]) - len(layout.spec)))
        for stage in layout.stages:
            stages[stage][name] = to_param_strategy(padded)
    return stages
