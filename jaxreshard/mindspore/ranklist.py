"""`mindspore.rank_list_for_transform`: which source ranks MindSpore loads for a destination rank.

It decides which files a destination rank's parameter list and order come from, and which missing rank
folders are an error, so it is reproduced exactly. MindSpore derives it from the AllConcat groups
of its redistribution planner on a fake shape; the equivalent rule: unify the device counts, keep a source
sharding axis if every destination block lies inside the source block with the destination device's own
coordinate on that axis, then a rank needs every source device agreeing with it on all replicated and kept
axes. It matches MindSpore on every conversion in the reference fixtures (tests/test_ranklist.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..formats.mindspore_strategy import ParamStrategy
from ..layout import COMPLETE, ParamLayout, unravel
from .strategy import param_layout


def needed_local_ranks(src: ParamLayout, dst: ParamLayout, local: int, ndim: int) -> set[int]:
    """Local source ranks one parameter needs for destination local rank `local`."""
    n_src, n_dst = src.devices_per_stage, dst.devices_per_stage
    n = max(n_src, n_dst)
    shape = tuple(n * b for b in src.blocks_per_dim(ndim))  # MindSpore's fake shape
    names = (("_repeat",) if n_src < n else ()) + src.axis_names
    sizes = ((n // n_src,) if n_src < n else ()) + src.mesh_shape
    mesh = dict(src.mesh_axes)
    sharding = {a for axes in src.spec for a in axes}

    def coords(u: int) -> dict[str, int]:
        return dict(zip(names, unravel(u, sizes)))

    kept = set()
    for axis in sharding:
        dim = next(i for i, axes in enumerate(src.spec) if axis in axes)
        axes = src.spec[dim]
        radix = [mesh[a] for a in axes]
        block = shape[dim] // math.prod(radix)
        stride, size = math.prod(radix[axes.index(axis) + 1 :]), mesh[axis]
        inside = True
        for u in range(n):
            box = dst.box(shape, u % n_dst)
            wanted = coords(u)[axis]
            blocks = range(box.start[dim] // block, (box.stop[dim] - 1) // block + 1)
            if any((b // stride) % size != wanted for b in blocks):
                inside = False
                break
        if inside:
            kept.add(axis)
    target = coords(local)
    fixed = [a for a in names if a not in sharding or a in kept]
    return {s % n_src for s in range(n) if all(coords(s)[a] == target[a] for a in fixed)}


def rank_list_for_transform(
    rank: int, src_map: Mapping[str, ParamStrategy] | None, dst_map: Mapping[str, ParamStrategy] | None,
    n_src: int, n_dst: int, source: str = "",
) -> list[int]:  # fmt: skip
    """Global source ranks for destination `rank`, descending (the order MindSpore loads them).

    `src_map`/`dst_map` are already pruned to the destination rank's pipeline stage, as MindSpore does.
    """
    if src_map is None:
        return [0]
    local = rank % n_dst if n_dst > 1 else rank
    need: set[int] = set()
    seen: set[tuple] = set()
    for name, p in src_map.items():
        if dst_map is not None and name not in dst_map:
            continue
        q = dst_map[name] if dst_map is not None else None
        if (p, q) in seen:
            continue
        seen.add((p, q))
        ndim = len(p.tensor_map)
        src_l = param_layout(name, p, ndim, p.stages, source)
        dst_l = param_layout(name, q, ndim, q.stages, source) if q is not None else COMPLETE
        need |= needed_local_ranks(src_l, dst_l, local, ndim)
    stages = {s for p in src_map.values() for s in p.stages}
    return sorted({s * n_src + x for s in stages for x in need}, reverse=True)
