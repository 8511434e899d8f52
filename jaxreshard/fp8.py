"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1, Kimi): each 2-D weight `W` stored as F8_E4M3 has a scale tensor
`W_scale_inv` with one float per block of 128 x 128 weights, shape [ceil(rows / 128), ceil(cols / 128)].

A scale belongs to its weight: it is laid out with the weight's spec (`ScaleFollowing`), and a layout that cuts
a weight inside a scale block is refused (`check_scale_blocks`), since a rank would then hold a block's weights
without one whole scale per block. `dequantize` plans `dtype(float32(W) * scale)` per block (the `Dequantize`
transform, applied to each destination box) and drops the scale tensors. The block size is the source's
`quantization_config.weight_block_size` in its `config.json`, else 128 x 128.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .errors import FormatError, LayoutError, PlanError
from .formats.base import TensorEntry
from .formats.safetensors_io import FP8_DTYPES
from .formats.untrusted import load_json, open_regular
from .layout import ParamLayout, format_spec
from .plan import LayoutLike, Plan, make_plan
from .transforms import Cast, Dequantize

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
MAX_CONFIG_BYTES = 16 << 20  # a config.json is kilobytes


def scale_pairs(names: Iterable[str]) -> dict[str, str]:
    """`{scale name: weight name}` for every `<W>_scale_inv` whose weight `<W>` is a parameter too."""
    names = set(names)
    return {n: n[: -len(SCALE_SUFFIX)] for n in sorted(names)
            if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in names}  # fmt: skip


def block_size(folder: Path) -> tuple[int, int]:
    """`quantization_config.weight_block_size` of `folder/config.json`, else 128 x 128 (DeepSeek's)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return DEFAULT_BLOCK
    with open_regular(path, "config.json") as f:
        if os.fstat(f.fileno()).st_size > MAX_CONFIG_BYTES:
            raise FormatError(f"{path}: over {MAX_CONFIG_BYTES} bytes; not a model config")
        config = load_json(f.read(), path, "config.json")
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if block is None:
        return DEFAULT_BLOCK
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and 0 < b <= 1 << 20 for b in block)):
        raise FormatError(f"{path}: quantization_config.weight_block_size is {str(block)[:40]}, not two positive "
                          "integers (rows, columns) such as [128, 128]")
    return block[0], block[1]


@dataclass(frozen=True)
class ScaleFollowing:
    """A layout under which each scale tensor takes its weight's layout (spec per dim, mesh, stages)."""

    layout: Any  # LayoutLike

    @property
    def num_ranks(self) -> int:
        return self.layout.num_ranks

    def resolve(self, params: Iterable[str]) -> dict[str, ParamLayout]:
        names = list(params)
        resolved = self.layout.resolve(names)
        for scale, weight in scale_pairs(names).items():
            resolved[scale] = resolved[weight]
        return resolved

    def __getattr__(self, name: str) -> Any:  # everything else (devices_per_stage, stages...) is the layout's
        if name == "layout":
            raise AttributeError(name)
        return getattr(self.layout, name)


@dataclass(frozen=True)
class _Resolved:
    """A layout that is already resolved (the source layouts a plan recorded)."""

    layouts: dict[str, ParamLayout]
    num_ranks: int

    def resolve(self, params: Iterable[str]) -> dict[str, ParamLayout]:
        return {p: self.layouts[p] for p in params}


def following(layout: LayoutLike | None) -> LayoutLike | None:
    return None if layout is None or isinstance(layout, ScaleFollowing) else ScaleFollowing(layout)


def check_scale_blocks(scale: str, weight: str, shape: tuple[int, ...], scale_shape: tuple[int, ...],
                       layouts: Mapping[str, ParamLayout], block: tuple[int, int]) -> None:
    """The scale's shape is its weight's in blocks, and no layout (`side` -> the weight's layout) cuts the
    weight inside a block."""
    check_scale_shapes({scale: (weight, shape, scale_shape)}, block)
    for side, layout in layouts.items():
        for dim, (n, k, b) in enumerate(zip(shape, layout.blocks_per_dim(2), block)):
            if k > 1 and (n % k or (n // k) % b):
                raise LayoutError(
                    f"parameter {weight!r}: the {side} spec {format_spec(layout.spec)} cuts dim {dim} ({n}) "
                    f"{k} ways, not at a multiple of its {b}-wide scale blocks ({scale!r}); split it fewer ways "
                    "or leave that dim whole")


def check_scale_shapes(scales: Mapping[str, tuple[str, tuple[int, ...], tuple[int, ...]]],
                       block: tuple[int, int]) -> None:
    """Each scale (name -> its weight, the weight's shape, its own shape) has one entry per weight block."""
    for scale, (weight, shape, scale_shape) in scales.items():
        want = tuple(math.ceil(n / b) for n, b in zip(shape, block))
        if len(shape) != 2 or scale_shape != want:
            raise FormatError(f"parameter {scale!r} has shape {list(scale_shape)} but {weight!r} {list(shape)} in "
                              f"{block[0]} x {block[1]} blocks needs {list(want)}; check "
                              "quantization_config.weight_block_size in config.json")


def dequantize(plan: Plan, dtype: np.dtype, block: tuple[int, int]) -> Plan:
    """The plan with every FP8 weight that has a scale stored as `dtype(float32(W) * scale)` and the scale
    tensors dropped. An FP8 weight without a scale is an error (its values would be meaningless)."""
    pairs = scale_pairs(plan.params)
    weights = {w: s for s, w in pairs.items()}
    bare = [p for p, i in plan.params.items() if is_fp8(i.src_dtype) and p not in weights]
    if bare:
        raise PlanError(f"--dequantize: FP8 parameter {bare[0]!r} has no {bare[0] + SCALE_SUFFIX!r} block scale "
                        f"({len(bare)} such); it cannot be dequantized")
    if not pairs:
        return plan
    scales = scales_plan(plan.src_entries, {s: plan.params[s].src_layout for s in pairs})
    params = {}
    for param, info in plan.params.items():
        if param in pairs:
            continue
        if param in weights:
            deq = Dequantize(weights[param], block, scales)
            rest = tuple(t for t in info.transforms if not isinstance(t, Cast))
            info = replace(info, transforms=(*rest, deq, Cast(np.dtype(dtype))))
        params[param] = info
    ranks = tuple(replace(r, shards=tuple(s for s in r.shards if s.param not in pairs)) for r in plan.ranks)
    return replace(plan, params=params, ranks=ranks)


def is_fp8(dtype: np.dtype) -> bool:
    return dtype in FP8_DTYPES



def scales_plan(src_entries: Mapping[int, Mapping[str, TensorEntry]], layouts: Mapping[str, ParamLayout]) -> Plan:
    """A plan reading each scale tensor of `layouts` (name -> its source layout) as one complete tensor."""
    entries = {r: {s: e[s] for s in layouts if s in e} for r, e in src_entries.items()}
    return make_plan(entries, _Resolved(dict(layouts), max(src_entries, default=0) + 1), None)


def dequantize_arrays(plan: Plan, scales: Plan, scale_of: Mapping[str, str], block: tuple[int, int]) -> Plan:
    """`jr.load(..., dequantize=True)`: each target parameter in `scale_of` (target name -> its scale's source
    name) dequantized to the dtype its request asked for (its last `Cast`, planned by the load)."""
    params = dict(plan.params)
    for param, scale in scale_of.items():
        info = params[param]
        dtype = info.dst_dtype if not is_fp8(info.dst_dtype) else np.dtype(ml_dtypes.bfloat16)
        rest = tuple(t for t in info.transforms if not isinstance(t, Cast))
        params[param] = replace(info, transforms=(*rest, Dequantize(scale, block, scales), Cast(dtype)))
    return replace(plan, params=params)


def dequantized_shape(full_shape: Callable[[str], tuple[tuple[int, ...], np.dtype]], weights: set[str],
                      cast: np.dtype | None) -> Callable[[str], tuple[tuple[int, ...], np.dtype]]:
    """A load's `full_shape` under which FP8 weights with scales have the dtype they are loaded as."""
    def shape_of(param: str) -> tuple[tuple[int, ...], np.dtype]:
        shape, dtype = full_shape(param)
        return (shape, cast or np.dtype(ml_dtypes.bfloat16)) if param in weights else (shape, dtype)

    return shape_of


def load_dequantized(plan: Plan, planner: Any, pairs: Mapping[str, str]) -> Plan:
    """The load plan with every requested weight that has a scale dequantized (see `dequantize_arrays`)."""
    weights = {w: s for s, w in pairs.items()}
    scale_of = {p: weights[i.param] for p, i in plan.params.items() if i.param in weights}
    if not scale_of:
        return plan
    source = getattr(planner, "source", None)
    if source is None:
        raise PlanError("dequantize=True reads block scales from safetensors or .ckpt files, not an orbax source")
    layouts = planner.src_layouts()
    scales = scales_plan(source.entries, {s: layouts[s] for s in scale_of.values()})
    shapes = {p: plan.params[p].shape for p in scale_of}
    check_scale_shapes({scale_of[p]: (p, shapes[p], scales.params[scale_of[p]].shape) for p in scale_of},
                       block_size(source.root))
    return dequantize_arrays(plan, scales, scale_of, block_size(source.root))
