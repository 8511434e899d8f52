"""Composed parameters (composed.py): a part's box mapping and in-memory arrangement agree with numpy."""

from __future__ import annotations

import numpy as np
import pytest

from jaxreshard.box import Box
from jaxreshard.composed import Composed, Part, arrange, pieces, src_view
from jaxreshard.coverage import ReadItem


def whole(part: Part, src: np.ndarray) -> np.ndarray:
    """The numpy reference of a part: its source region squeezed, transposed, expanded."""
    data = src[part.src_region.to_slices()]
    if part.unstack is not None:
        data = np.squeeze(data, part.unstack)
    if part.perm is not None:
        data = np.transpose(data, part.perm)
    return np.expand_dims(data, part.stack) if part.stack is not None else data


PARTS = [  # (part, source shape)
    (Part("a", Box((0, 0, 0), (2, 3, 4)), Box((0, 0, 0), (4, 2, 3)), perm=(2, 0, 1)), (2, 3, 4)),
    (Part("e2", Box((0, 0), (6, 4)), Box((2, 0, 0), (3, 4, 6)), perm=(1, 0), stack=0), (6, 4)),
    (Part("s", Box((1, 0, 0), (2, 6, 4)), Box((0, 0), (4, 6)), perm=(1, 0), unstack=0), (3, 6, 4)),
    (Part("q", Box((2, 0), (4, 5)), Box((6, 0), (8, 5))), (8, 5)),
]


@pytest.mark.parametrize(("part", "shape"), PARTS, ids=["transpose3d", "stack+T", "unstack+T", "cut"])
def test_every_sub_box_maps_to_the_source_region_that_lands_in_it(part, shape):
    rng = np.random.default_rng(0)
    src = rng.standard_normal(shape)
    ref = np.zeros(part.dst_region.stop)
    ref[part.dst_region.to_slices()] = whole(part, src)
    for _ in range(20):  # random sub-boxes of the destination region
        lo = [int(rng.integers(a, b)) for a, b in zip(part.dst_region.start, part.dst_region.stop)]
        hi = [int(rng.integers(x + 1, b + 1)) for x, b in zip(lo, part.dst_region.stop)]
        box = Box(tuple(lo), tuple(hi))
        src_box = part.to_src(box)
        np.testing.assert_array_equal(arrange(part, src[src_box.to_slices()]), ref[box.to_slices()])
        view = src_view(part, np.empty(box.shape))
        assert (view is None) == (part.perm is not None)  # permuted parts are read into a buffer of their own
        if view is not None:
            assert view.shape == src_box.shape


def test_pieces_of_a_box_spanning_experts():
    parts = tuple(Part(f"e{e}", Box((0, 0), (4, 2)), Box((e, 0, 0), (e + 1, 4, 2)), stack=0) for e in range(3))
    asked = []

    def cover(name: str, box: Box) -> tuple[ReadItem, ...]:
        asked.append((name, box))
        return (ReadItem(0, box, box),)

    got = pieces(Composed(parts, "r"), Box((1, 2, 0), (3, 4, 2)), cover)
    assert [p.part.src_param for p in got] == ["e1", "e2"]  # expert 0 is not read at all
    assert asked == [("e1", Box((2, 0), (4, 2))), ("e2", Box((2, 0), (4, 2)))]  # only the rows the box needs
