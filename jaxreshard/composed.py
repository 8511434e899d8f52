"""Destination tensors composed of other source tensors (transforms: transpose, stack, concat), box by box.

A composed destination parameter is a list of `Part`s: each names a region of one source tensor and the region
of the destination it becomes (squeezing a unit axis, permuting axes, inserting a unit axis on the way). A
destination box then reads, from each part it meets, exactly the source region that lands in it (`pieces`), so
no whole tensor is ever gathered: transposing reads the permuted box and transposes it in memory; a box of a
stacked `[E, ...]` tensor spanning experts e0..e1 reads that slice of each expert's tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .box import Box
from .coverage import ReadItem


@dataclass(frozen=True, slots=True)
class Part:
    """`src_region` of source tensor `src_param` becomes `dst_region` of the destination: squeeze `unstack`
    (a unit source axis), then permute by `perm` (destination axis i = source axis perm[i]), then insert a unit
    axis at `stack`."""

    src_param: str
    src_region: Box
    dst_region: Box
    perm: tuple[int, ...] | None = None
    unstack: int | None = None
    stack: int | None = None

    def is_whole(self, src_shape: tuple[int, ...]) -> bool:
        """The whole source tensor as it is (a rename): read like any stored tensor, under the new name."""
        return self.perm is None and self.stack is None and self.unstack is None and \
            self.src_region == Box.full(src_shape)  # fmt: skip

    def to_src(self, dst_box: Box) -> Box:
        """The source region that lands in `dst_box` (a sub-box of `dst_region`), in source coordinates."""
        start = [a - o for a, o in zip(dst_box.start, self.dst_region.start)]
        stop = [a - o for a, o in zip(dst_box.stop, self.dst_region.start)]
        if self.stack is not None:
            del start[self.stack], stop[self.stack]
        if self.perm is not None:
            inv = inverse(self.perm)
            start, stop = [start[i] for i in inv], [stop[i] for i in inv]
        if self.unstack is not None:
            start.insert(self.unstack, 0)
            stop.insert(self.unstack, 1)
        base = self.src_region.start
        return Box(tuple(a + o for a, o in zip(start, base)), tuple(a + o for a, o in zip(stop, base)))


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of one destination box: `src_box` of `src_param`, read by `reads`, lands at `region` (destination
    coordinates) after the part's squeeze / permute / insert."""

    part: Part
    region: Box
    src_box: Box
    reads: tuple[ReadItem, ...]


@dataclass(frozen=True, slots=True)
class Composed:
    """The parameter is composed of regions of other source tensors (a transform rule): each destination box
    reads, from each part, only the source region it needs (`ShardPlan.pieces`)."""

    parts: tuple[Part, ...]
    rule: str  # for messages and `jaxreshard plan`


def inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def pieces(composed: Composed, box: Box, cover: Callable[[str, Box], tuple[ReadItem, ...]]) -> tuple[Piece, ...]:
    """The pieces of destination `box`: for every part it meets, the source region to read (`cover` gives the
    reads of one region of one source tensor)."""
    out = []
    for part in composed.parts:
        region = part.dst_region.intersect(box)
        if region is None or region.size == 0:
            continue
        src_box = part.to_src(region)
        out.append(Piece(part, region, src_box, cover(part.src_param, src_box)))
    return tuple(out)


def arrange(part: Part, data: np.ndarray) -> np.ndarray:
    """Source data (shape of a source box) in destination order (shape of the destination region): a view."""
    if part.unstack is not None:
        data = np.squeeze(data, part.unstack)
    if part.perm is not None:
        data = data.transpose(part.perm)
    if part.stack is not None:
        data = np.expand_dims(data, part.stack)
    return data


def src_view(part: Part, view: np.ndarray) -> np.ndarray | None:
    """A view of the destination region `view` in source order, to read into directly; None when the part
    permutes axes (the data is read into its own buffer and transposed in memory)."""
    if part.perm is not None:
        return None
    if part.stack is not None:
        view = np.squeeze(view, part.stack)
    if part.unstack is not None:
        view = np.expand_dims(view, part.unstack)
    return view
