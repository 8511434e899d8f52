"""One parameter's layout: a mesh, a PartitionSpec-like spec and the pipeline stages holding it, with the box
each rank holds (`ParamLayout.box`). Pure: no JAX, no files. `layout.py` reads whole layouts (rules matched
against parameter names) and re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .box import Box
from .errors import LayoutError

Spec = tuple[tuple[str, ...], ...]  # per tensor dim: mesh axes splitting it, major first; () = whole


@dataclass(frozen=True, slots=True)
class ParamLayout:
    """How one parameter is laid out: the mesh it lives on, its spec, and the pipeline stages holding it.

    Each parameter carries its own mesh shape because MindSpore strategies give every parameter its own
    device matrix (same device count per stage, different factorisations).
    """

    mesh_axes: tuple[tuple[str, int], ...]
    spec: Spec
    stages: tuple[int, ...]

    @property
    def devices_per_stage(self) -> int:
        return math.prod(size for _, size in self.mesh_axes)

    def blocks_per_dim(self, ndim: int) -> tuple[int, ...]:
        """How many blocks each tensor dim is cut into (memoised: asked once per tensor of a 90k-tensor plan)."""
        return _blocks_per_dim(self.mesh_axes, self.spec, ndim)

    def check_shape(self, param: str, shape: Sequence[int]) -> None:
        """Raise `LayoutError` unless the spec fits `shape` and divides every split dimension evenly."""
        if len(self.spec) > len(shape):
            raise LayoutError(
                f"parameter {param!r} has shape {list(shape)} ({len(shape)} dims) but its spec "
                f"{format_spec(self.spec)} has {len(self.spec)} entries; shorten the spec"
            )
        for dim, (size, k) in enumerate(zip(shape, self.blocks_per_dim(len(shape)))):
            if size % k:
                raise LayoutError(
                    f"parameter {param!r} dim {dim} of size {size} cannot be split {k} ways by spec "
                    f"{format_spec(self.spec)} on mesh {dict(self.mesh_axes)}; use a layout whose split divides it"
                )

    def block_coords(self, local_rank: int, ndim: int) -> tuple[int, ...]:
        """Block index per tensor dim held by `local_rank` (mixed radix over the dim's axes, major first)."""
        names = [name for name, _ in self.mesh_axes]
        sizes = [size for _, size in self.mesh_axes]
        coord = dict(zip(names, unravel(local_rank, sizes)))
        out = []
        for i in range(ndim):
            c = 0
            for axis in self.spec[i] if i < len(self.spec) else ():
                c = c * dict(self.mesh_axes)[axis] + coord[axis]
            out.append(c)
        return tuple(out)

    def box(self, shape: Sequence[int], local_rank: int) -> Box:
        """The box of a parameter of full `shape` held by `local_rank` (shape must be checked first)."""
        coords = self.block_coords(local_rank, len(shape))
        blocks = self.blocks_per_dim(len(shape))
        start = tuple(c * (s // k) for c, s, k in zip(coords, shape, blocks))
        stop = tuple(a + s // k for a, s, k in zip(start, shape, blocks))
        return Box(start, stop)

    def global_ranks(self) -> list[int]:
        return list(self.rank_tuple)

    @property
    def rank_tuple(self) -> tuple[int, ...]:
        """`global_ranks` as a shared tuple (memoised; for loops over every tensor of a large checkpoint)."""
        return _global_ranks(self.devices_per_stage, self.stages)

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.mesh_axes)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.mesh_axes)

    def partition_spec(self) -> Any:
        """The equivalent `jax.sharding.PartitionSpec` (imports JAX)."""
        from jax.sharding import PartitionSpec

        return PartitionSpec(*[None if not axes else axes[0] if len(axes) == 1 else axes for axes in self.spec])


@lru_cache(maxsize=4096)
def _blocks_per_dim(mesh_axes: tuple[tuple[str, int], ...], spec: Spec, ndim: int) -> tuple[int, ...]:
    sizes = dict(mesh_axes)
    return tuple(math.prod(sizes[a] for a in spec[i]) if i < len(spec) else 1 for i in range(ndim))


@lru_cache(maxsize=4096)
def _global_ranks(n: int, stages: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(stage * n + local for stage in stages for local in range(n))


COMPLETE = ParamLayout(mesh_axes=(), spec=(), stages=(0,))  # a whole tensor on a single rank


def unravel(index: int, sizes: Sequence[int]) -> list[int]:
    out = []
    for size in reversed(sizes):
        out.append(index % size)
        index //= size
    return out[::-1]


def format_spec(spec: Spec) -> str:
    parts = ["null" if not axes else axes[0] if len(axes) == 1 else "[" + ", ".join(axes) + "]" for axes in spec]
    return "[" + ", ".join(parts) + "]"
