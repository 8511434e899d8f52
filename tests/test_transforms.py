"""Typed per-box transforms (transforms.py): plain data, pure math, applied by arrays.APPLY once per type."""

from __future__ import annotations

import dataclasses
import typing

import ml_dtypes
import numpy as np
import pytest

from jaxreshard.arrays import APPLY
from jaxreshard.box import Box
from jaxreshard.errors import FormatError
from jaxreshard.plan import Plan
from jaxreshard.transforms import (
    Cast,
    Dequantize,
    LoraFold,
    Transform,
    cast_box,
    dequantize_box,
    fold_box,
    scale_region,
)


def fold(transposed: bool = False, scaling: float = 0.5) -> LoraFold:
    return LoraFold("m", Plan({}, (), {}), "m.lora_a", "m.lora_b", scaling, transposed)


def test_transforms_are_frozen_values():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Cast(np.dtype("f2")).dtype = np.dtype("f4")  # type: ignore[misc]
    assert Cast(np.dtype("f2")) == Cast(np.dtype("f2"))
    # every transform type has its one executor function (issue 10 adds Dequantize: checked against the union)
    assert set(APPLY) == set(typing.get_args(Transform)) and {Cast, LoraFold, Dequantize} <= set(APPLY)


def test_cast_box_rounds_like_astype_into_an_aligned_buffer():
    buf = np.array([[1.0, 1 / 3], [65504.0, 1e-8]], np.float32)
    out = cast_box(buf, np.dtype(ml_dtypes.bfloat16))
    assert out.dtype == ml_dtypes.bfloat16 and out.ctypes.data % 64 == 0
    assert out.tobytes() == buf.astype(ml_dtypes.bfloat16).tobytes()


def test_fold_box_merges_one_box_of_the_base():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)  # r=2, in=3
    b = np.arange(8, dtype=np.float32).reshape(4, 2)  # out=4, r=2
    base = np.ones((4, 3), np.float16)
    expected = (base.astype(np.float32) + 0.5 * (b @ a)).astype(np.float16)
    box = Box((2, 1), (4, 3))  # rows 2-3, columns 1-2 of the base
    piece = base[2:4, 1:3].copy()
    worst = fold_box(fold(), "m.weight", box, piece, a, b)
    assert piece.tobytes() == expected[2:4, 1:3].tobytes()
    assert worst == float(np.abs(0.5 * (b @ a))[2:4, 1:3].max())


def test_fold_box_transposed_base():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(8, dtype=np.float32).reshape(4, 2)
    base = np.zeros((3, 4), np.float32)  # stored (in, out)
    piece = base[0:3, 0:2].copy()
    fold_box(fold(transposed=True, scaling=1.0), "m.weight", Box((0, 0), (3, 2)), piece, a, b)
    assert np.array_equal(piece, (b @ a).T[0:3, 0:2])


def test_fold_box_overflow_names_the_module():
    a = np.full((1, 2), 300.0, np.float32)
    b = np.full((2, 1), 300.0, np.float32)
    piece = np.zeros((2, 2), np.float16)
    with pytest.raises(FormatError, match=r"merging LoRA 'm' into 'm.weight' gives NaN or Inf in float16"):
        fold_box(fold(scaling=1.0), "m.weight", Box((0, 0), (2, 2)), piece, a, b)


def test_dequantize_box_takes_each_element_s_block_scale():
    w = np.arange(5 * 7, dtype=np.float32).reshape(5, 7).astype(ml_dtypes.float8_e4m3fn)
    scale = np.array([[2.0, 3.0, 5.0], [7.0, 11.0, 13.0]], np.float32)  # blocks of 3 x 3 over a 5 x 7 weight
    box = Box((2, 1), (5, 6))
    out = dequantize_box(Dequantize("w_scale_inv", (3, 3), Plan({}, (), {})), box, w[2:5, 1:6], scale)
    expected = np.array([[float(w[i, j]) * float(scale[i // 3, j // 3]) for j in range(1, 6)] for i in range(2, 5)],
                        np.float32)
    assert out.dtype == np.float32 and out.ctypes.data % 64 == 0
    np.testing.assert_array_equal(out, expected)


def test_dequantize_box_with_a_scale_region():
    w = np.ones((6, 6), np.float32).astype(ml_dtypes.float8_e4m3fn)
    scale = np.array([[2.0, 3.0], [5.0, 7.0]], np.float32)  # 3 x 3 blocks
    deq = Dequantize("w_scale_inv", (3, 3), Plan({}, (), {}))
    box = Box((3, 1), (6, 4))  # rows in block row 1, columns in block columns 0 and 1
    region = scale_region(deq, box)
    assert region == Box((1, 0), (2, 2))
    out = dequantize_box(deq, box, w[3:6, 1:4], scale[1:2, 0:2], region)
    np.testing.assert_array_equal(out, np.array([[5, 5, 7]] * 3, np.float32))
