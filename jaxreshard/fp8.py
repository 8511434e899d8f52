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
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, LayoutError, PlanError
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


def check_scale_blocks(plan: Plan, block: tuple[int, int]) -> None:
    """Each scale's shape is its weight's in blocks, and neither layout cuts the weight inside a block."""
    for scale, weight in scale_pairs(plan.params).items():
        w, s = plan.params[weight], plan.params[scale]
        if len(w.shape) != 2:
            raise FormatError(f"parameter {scale!r}: block scales are for 2-D weights, but {weight!r} has shape "
                              f"{list(w.shape)}")
        want = tuple(math.ceil(n / b) for n, b in zip(w.shape, block))
        if s.shape != want:
            raise FormatError(f"parameter {scale!r} has shape {list(s.shape)} but {weight!r} {list(w.shape)} in "
                              f"{block[0]} x {block[1]} blocks needs {list(want)}; check "
                              "quantization_config.weight_block_size in config.json")
        for side, layout in (("source", w.src_layout), ("destination", w.dst_layout)):
            for dim, (n, k, b) in enumerate(zip(w.shape, layout.blocks_per_dim(2), block)):
                if k > 1 and (n // k) % b:
                    raise LayoutError(
                        f"parameter {weight!r}: the {side} spec {format_spec(layout.spec)} cuts dim {dim} "
                        f"({n}) into blocks of {n // k}, not a multiple of its {b}-wide scale blocks "
                        f"({scale!r}); split it fewer ways or leave that dim whole")


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
    entries = {r: {s: e[s] for s in pairs if s in e} for r, e in plan.src_entries.items()}
    layouts = _Resolved({s: plan.params[s].src_layout for s in pairs}, max(plan.src_entries, default=0) + 1)
    scales = make_plan(entries, layouts, None)
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
    return dtype.itemsize == 1 and dtype.kind == "V"

