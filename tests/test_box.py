import numpy as np
import pytest

from jaxreshard.box import Box, byte_runs, is_contiguous


def runs(box, shape, itemsize=1):
    return list(byte_runs(box, shape, itemsize))


def test_full_tensor_is_one_run():
    assert runs(Box.full((4, 6)), (4, 6), 4) == [(0, 96)]


def test_scalar_is_one_run():
    assert runs(Box((), ()), (), 8) == [(0, 8)]


def test_leading_rows_are_one_run():
    assert runs(Box((1, 0), (3, 6)), (4, 6), 2) == [(12, 24)]


def test_column_block_is_one_run_per_row():
    assert runs(Box((0, 2), (3, 4)), (3, 6), 4) == [(8, 8), (32, 8), (56, 8)]


def test_middle_dim_of_3d():
    # shape (2, 4, 3), rows 1:3 of dim 1 in both dim-0 slabs
    assert runs(Box((0, 1, 0), (2, 3, 3)), (2, 4, 3), 1) == [(3, 6), (15, 6)]


def test_runs_match_numpy_bytes():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, size=(3, 5, 4, 2), dtype=np.uint8)
    box = Box((1, 1, 2, 0), (3, 4, 4, 2))
    flat = a.tobytes()
    got = b"".join(flat[o : o + n] for o, n in byte_runs(box, a.shape, 1))
    assert got == a[box.to_slices()].tobytes()


def test_intersect_and_contains():
    a, b = Box((0, 0), (4, 4)), Box((2, 3), (6, 8))
    assert a.intersect(b) == Box((2, 3), (4, 4))
    assert a.intersect(Box((4, 0), (5, 4))) is None
    assert a.contains(Box((1, 1), (2, 4)))
    assert not a.contains(b)
    assert Box((), ()).intersect(Box((), ())) == Box((), ())


def test_from_index_and_relative():
    box = Box.from_index((slice(2, 4), slice(None)), (8, 6))
    assert box == Box((2, 0), (4, 6))
    assert box.shape == (2, 6) and box.size == 12
    assert Box((3, 1), (4, 5)).relative_to(box) == Box((1, 1), (2, 5))
    with pytest.raises(ValueError):
        Box.from_index((slice(0, 8, 2),), (8,))


def test_is_contiguous():
    assert is_contiguous(Box((2, 0), (4, 6)), (8, 6))
    assert is_contiguous(Box((2, 1), (3, 4)), (8, 6))
    assert not is_contiguous(Box((2, 1), (4, 4)), (8, 6))
