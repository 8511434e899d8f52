"""Boxes: axis-aligned hyper-rectangles of a tensor, in global element coordinates.

All resharding geometry is box arithmetic (torch DCP's `resharding.py` vocabulary): a rank holds a box of
each parameter, a destination box is covered by its intersections with source boxes, and each intersection
is read from its source file at byte offsets that `byte_runs` computes. Pure math, no I/O, no JAX.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Box:
    """Half-open box `[start, stop)` per dimension. A 0-d tensor has the empty box `Box((), ())`."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @staticmethod
    def full(shape: Sequence[int]) -> Box:
        return Box(tuple(0 for _ in shape), tuple(int(s) for s in shape))

    @staticmethod
    def from_index(index: Sequence[slice], shape: Sequence[int]) -> Box:
        """The box a JAX device index (a tuple of slices, as `make_array_from_callback` passes) selects."""
        starts, stops = [], []
        for sl, size in zip(index, shape, strict=True):
            start, stop, step = sl.indices(size)
            if step != 1:
                raise ValueError(f"strided index {sl} is not a box")
            starts.append(start)
            stops.append(stop)
        return Box(tuple(starts), tuple(stops))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(map(operator.sub, self.stop, self.start))

    @property
    def size(self) -> int:
        return math.prod(map(operator.sub, self.stop, self.start))

    def intersect(self, other: Box) -> Box | None:
        """The common box, or None when they do not overlap (0-d boxes always overlap)."""
        start = tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        if any(a >= b for a, b in zip(start, stop)):
            return None
        return Box(start, stop)

    def contains(self, other: Box) -> bool:
        return all(a <= c and d <= b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop))

    def relative_to(self, outer: Box) -> Box:
        """This box in the local coordinates of `outer` (which must contain it)."""
        return Box(
            tuple(a - o for a, o in zip(self.start, outer.start)),
            tuple(b - o for b, o in zip(self.stop, outer.start)),
        )

    def to_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def __str__(self) -> str:
        return "[" + ", ".join(f"{a}:{b}" for a, b in zip(self.start, self.stop)) + "]"


def byte_runs(box: Box, shape: Sequence[int], itemsize: int) -> Iterator[tuple[int, int]]:
    """`(byte_offset, nbytes)` runs, in C order, that hold `box` of a C-ordered tensor of `shape`.

    Trailing dimensions the box covers whole merge into one run, so a block of leading-dim rows is a single
    run and a column block of a matrix is one run per row (orbax's `index_domain_to_byte_runs`).
    """
    shape = tuple(shape)
    ndim = len(shape)
    if box.size == 0 and ndim:
        return
    # k = first dim from which the box covers everything to the right: those dims form one contiguous run.
    k = ndim
    while k > 0 and box.start[k - 1] == 0 and box.stop[k - 1] == shape[k - 1]:
        k -= 1
    if k == 0:
        yield 0, math.prod(shape) * itemsize
        return
    # dim k-1 is partial: contiguous along it, so one run per index of dims 0..k-2.
    inner = math.prod(shape[k:]) * itemsize
    run_bytes = (box.stop[k - 1] - box.start[k - 1]) * inner
    strides = [0] * ndim
    acc = itemsize
    for d in range(ndim - 1, -1, -1):
        strides[d] = acc
        acc *= shape[d]
    base = box.start[k - 1] * strides[k - 1]
    outer_ranges = [range(box.start[d], box.stop[d]) for d in range(k - 1)]
    for idx in _product(outer_ranges):
        yield base + sum(i * strides[d] for d, i in enumerate(idx)), run_bytes


def _product(ranges: list[range]) -> Iterator[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for head in ranges[0]:
        for tail in _product(ranges[1:]):
            yield (head, *tail)


def is_contiguous(box: Box, shape: Sequence[int]) -> bool:
    """True when `box` of a C-ordered `shape` tensor is one contiguous byte range."""
    runs = 0
    for _ in byte_runs(box, shape, 1):
        runs += 1
        if runs > 1:
            return False
    return True
