"""Typed per-box transforms of a plan: plain frozen data, applied by the executor to each destination box.

A transform never does I/O: `LoraFold` names the factors and the plan that reads them, and the executor
reads them (`execute.read_factors`) before calling the pure math here. Each kind is one class; the executor
dispatches once per class, so a new transform (transpose, stack, dequantize) is one class here plus one
function in the executor's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .box import Box
from .errors import FormatError
from .formats.base import aligned_empty

if TYPE_CHECKING:
    from .plan import Plan


@dataclass(frozen=True, slots=True)
class Cast:
    """Store the parameter as `dtype` (`--dtype`: floating parameters only; planned by `plan.with_dtype`)."""

    dtype: np.dtype


@dataclass(frozen=True)
class LoraFold:
    """Merge one LoRA branch into every destination box of its base weight: W + scaling * B @ A, in the
    working precision (float32, float64 for float64 bases), rounded once to the base's dtype."""

    module: str
    factors: Plan  # reads A and B as complete tensors from their own source (the base model or an adapter)
    a: str
    b: str
    scaling: float
    transposed: bool  # the base is stored (in, out) (PEFT fan_in_fan_out, GPT-2 Conv1D)


@dataclass(frozen=True)
class Dequantize:
    """A block-scaled FP8 weight as float32(W) * scale per block (`fp8.dequantize` plans it, followed by a
    `Cast` to the stored dtype, so values are rounded once); `scales` reads the scale tensor `scale`."""

    scale: str
    block: tuple[int, int]
    scales: Plan  # where the scale tensor lies in the source; each box reads only the scale blocks it covers


Transform = Cast | LoraFold | Dequantize


def cast_box(buf: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`buf` as `dtype` in a fresh aligned buffer (values converted as numpy's `astype` does)."""
    out = aligned_empty(buf.shape, dtype)
    np.copyto(out, buf, casting="unsafe")
    return out


def fold_box(fold: LoraFold, param: str, box: Box, buf: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Merge the branch (complete factors `a`, `b`) into the box `box` of `param`, in place; returns the
    largest |delta| (for the log). NaN or Inf after rounding is an error naming the module."""
    work = np.float64 if buf.dtype == np.float64 else np.float32
    a, b = a.astype(work), b.astype(work)
    (r0, c0), (r1, c1) = box.start, box.stop
    if fold.transposed:
        delta = (fold.scaling * (b[c0:c1] @ a[:, r0:r1])).T
    else:
        delta = fold.scaling * (b[r0:r1] @ a[:, c0:c1])
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
        merged = (buf.astype(work) + delta).astype(buf.dtype)
    if not np.isfinite(merged.astype(np.float32) if merged.dtype.itemsize < 4 else merged).all():
        raise FormatError(f"merging LoRA {fold.module!r} into {param!r} gives NaN or Inf in {buf.dtype}; "
                          "check the adapter and --lora-scaling")
    buf[...] = merged
    return float(np.abs(delta).max()) if delta.size else 0.0


def scale_region(deq: Dequantize, box: Box) -> Box:
    """The scale blocks a box of the weight lies in."""
    return Box(tuple(a // b for a, b in zip(box.start, deq.block)),
               tuple(-(-z // b) for z, b in zip(box.stop, deq.block)))


def dequantize_box(
    deq: Dequantize, box: Box, buf: np.ndarray, scale: np.ndarray, region: Box | None = None
) -> np.ndarray:
    """float32(buf) * scale, where `buf` is box `box` of the weight and `scale` the region `region` of the scale
    tensor (default: all of it): element (i, j) takes the scale of its block, scale[i // rows, j // cols]."""
    origin = region.start if region is not None else (0, 0)
    rows = np.arange(box.start[0], box.stop[0]) // deq.block[0] - origin[0]
    cols = np.arange(box.start[1], box.stop[1]) // deq.block[1] - origin[1]
    out = aligned_empty(buf.shape, np.dtype(np.float32))
    np.multiply(buf.astype(np.float32), scale.astype(np.float32)[np.ix_(rows, cols)], out=out)
    return out
