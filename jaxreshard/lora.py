"""Folding LoRA branches into base weights: W' = cast(float32(W) + s * float32(B) @ float32(A)), rounded once.

Recognised names (module X): `X.mindpet_delta_lora_a/_b` (MindSpore mindpet), `X.lora_a/.lora_b`, and PEFT's
`X.lora_A.weight/.lora_B.weight`, whose base is `X.weight` or `X.base_layer.weight` (written as `X.weight`);
keys of a PEFT adapter lose their `base_model.model.` prefix. The fold is planned like any conversion: the
output holds exactly the base parameters, laid out as asked, and each destination box of a base weight is
merged in place after it is read (the factors, r x in and out x r, are read whole; the base weight never is),
so memory stays one weight's boxes at a time whatever the layouts.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .box import Box
from .errors import ConfigError, FormatError, PlanError
from .formats.adapter_config import read_adapter_config
from .formats.base import FileHandles, TensorEntry, aligned_empty
from .formats.mindspore_ckpt import OPTIMIZER_STATE_PREFIXES as OPTIMIZER_PREFIXES  # noqa: F401 - for merge.py
from .plan import Plan

log = logging.getLogger(__name__)

_PAIRS = (  # (suffix of A, suffix of B)
    (".mindpet_delta_lora_a", ".mindpet_delta_lora_b"),
    (".lora_a", ".lora_b"),
    (".lora_A.weight", ".lora_B.weight"),
)
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraPair:
    module: str
    a: str
    b: str


def find_pairs(names: list[str]) -> dict[str, LoraPair]:
    """LoRA factor pairs by module name; an A without its B (or the reverse) is an error."""
    pairs: dict[str, LoraPair] = {}
    present = set(names)
    for name in names:
        for suffix_a, suffix_b in _PAIRS:
            for mine, other, is_a in ((suffix_a, suffix_b, True), (suffix_b, suffix_a, False)):
                if name.endswith(mine):
                    module = name[: -len(mine)]
                    partner = module + other
                    if partner not in present:
                        raise PlanError(f"LoRA factor {name!r} has no partner {partner!r}")
                    if is_a:
                        pairs[module] = LoraPair(module, name, partner)
    return pairs


def is_lora(name: str) -> bool:
    return any(name.endswith(s) for pair in _PAIRS for s in pair)


def base_name(name: str) -> str:
    """The output name of a base weight (PEFT's `X.base_layer.weight` becomes `X.weight`)."""
    return name.replace(".base_layer.", ".")


@dataclass(frozen=True)
class Scaling:
    """`--lora-scaling`, or PEFT's adapter_config.json: lora_alpha / r (or / sqrt(r) with use_rslora), with
    per-module `alpha_pattern` / `rank_pattern`."""

    value: float | None = None
    config: Mapping | None = None
    source: str = ""

    def for_module(self, module: str) -> float:
        if self.value is not None:
            return self.value
        if self.config is None:
            raise ConfigError(f"no LoRA scaling for {module!r}: pass --lora-scaling, or an adapter directory with "
                              "adapter_config.json (lora_alpha and r)")
        cfg = self.config
        r = _pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r"))
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha"))
        if not r or alpha is None:
            raise ConfigError(f"{self.source}: needs lora_alpha and r to scale {module!r}")
        return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else float(r))


def _pattern(patterns: Mapping, module: str, default):
    """PEFT's rule: the first key that matches the end of the module name (at a `.` boundary)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_scaling(lora_scaling: float | None, adapter: Path | None) -> Scaling:
    """The scale from `--lora-scaling` (finite) or the adapter's config; the config, when the adapter has one,
    is always read and checked (it also says whether square bases are stored transposed)."""
    if lora_scaling is not None and not math.isfinite(lora_scaling):
        raise ConfigError(f"--lora-scaling must be a finite number, got {lora_scaling}")
    value = None if lora_scaling is None else float(lora_scaling)
    if adapter is not None:
        cfg_path = (adapter if adapter.is_dir() else adapter.parent) / "adapter_config.json"
        if os.path.lexists(cfg_path):
            return Scaling(value, read_adapter_config(cfg_path), str(cfg_path))
    return Scaling(value)


@dataclass(frozen=True)
class LoraFold:
    """How to merge one base weight: its factors' complete reads (in `factors`) and the scale."""

    module: str
    factors: Plan  # plans A and B as complete tensors, from their own source
    a: str
    b: str
    scaling: float
    transposed: bool  # the base is stored (in, out) (PEFT fan_in_fan_out, GPT-2 Conv1D)

    def apply(self, param: str, boxes: list[tuple[Box, np.ndarray]]) -> None:
        """Merge the branch into every destination box of the base weight, in place."""
        factor = {}
        with FileHandles() as handles:
            from .fill import fill_boxes

            for name in (self.a, self.b):
                info = self.factors.params[name]
                shard = next(s for r in self.factors.ranks for s in r.shards if s.param == name)
                buf = aligned_empty(info.shape, info.src_dtype)
                fill_boxes(self.factors, [(shard, buf)], handles)
                factor[name] = buf
        worst = 0.0
        for box, buf in boxes:
            work = np.float64 if buf.dtype == np.float64 else np.float32
            a, b = factor[self.a].astype(work), factor[self.b].astype(work)
            (r0, c0), (r1, c1) = box.start, box.stop
            if self.transposed:
                delta = (self.scaling * (b[c0:c1] @ a[:, r0:r1])).T
            else:
                delta = self.scaling * (b[r0:r1] @ a[:, c0:c1])
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
                merged = (buf.astype(work) + delta).astype(buf.dtype)
            if not np.isfinite(merged.astype(np.float32) if merged.dtype.itemsize < 4 else merged).all():
                raise FormatError(f"merging LoRA {self.module!r} into {param!r} gives NaN or Inf in {buf.dtype}; "
                                  "check the adapter and --lora-scaling")
            worst = max(worst, float(np.abs(delta).max()) if delta.size else 0.0)
            buf[...] = merged
        log.info("merged LoRA %s into %s (scale %g): max |delta| %.6g", self.module, param, self.scaling, worst)


def fold_for(module: str, pair: LoraPair, base_shape: tuple[int, ...], factors: Plan, scaling: float,
             fan_in_fan_out: bool) -> LoraFold:
    """Check the shapes and decide the orientation of one fold."""
    a_shape, b_shape = factors.params[pair.a].shape, factors.params[pair.b].shape
    if len(base_shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise PlanError(f"LoRA {module!r}: A {list(a_shape)} and B {list(b_shape)} do not fit a 2-D base "
                        f"{list(base_shape)}; expected A [r, in] and B [out, r]")
    straight = base_shape == (b_shape[0], a_shape[1])
    crossed = base_shape == (a_shape[1], b_shape[0])
    if not (straight or crossed):
        raise PlanError(f"LoRA {module!r}: B @ A is {[b_shape[0], a_shape[1]]} but the base weight is "
                        f"{list(base_shape)}")
    transposed = crossed and (fan_in_fan_out or not straight)
    return LoraFold(module, factors, pair.a, pair.b, scaling, transposed)


def strip_peft(entries: Mapping[str, TensorEntry]) -> dict[str, TensorEntry]:
    return {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): e for k, e in entries.items()}
