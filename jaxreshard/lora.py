"""`merge-lora`: fold LoRA branches into base weights, W' = cast(float32(W) + s * float32(B) @ float32(A)), rounded
once.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import remote
from .errors import ConfigError, FormatError, PlanError
from .formats import open_source
from .formats.adapter_config import read_adapter_config
from .formats.base import TensorEntry
from .formats.mindspore_ckpt import OPTIMIZER_STATE_PREFIXES
from .formats.writers import OutputKind
from .fsutil import check_destination, check_file_prefix
from .jobs import Job, write_job
from .layout import ParamLayout
from .plan import LayoutLike, Plan, make_plan, merge_orders
from .planners.native import native_layouts
from .planners.sides import LayoutArg
from .transforms import LoraFold as LoraFold  # the plan's typed transform; re-exported
from .values import parse_size

log = logging.getLogger(__name__)

_PAIRS = (  # (suffix of A, suffix of B)
    (".mindpet_delta_lora_a", ".mindpet_delta_lora_b"),
    (".lora_a", ".lora_b"),
    (".lora_A.weight", ".lora_B.weight"),
)
OPTIMIZER_PREFIXES = OPTIMIZER_STATE_PREFIXES  # MindSpore optimizer states ("adam_m." ...), dropped by default
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


def is_lora(param: str) -> bool:
    return any(param.endswith(s) for pair in _PAIRS for s in pair)


def base_name(param: str) -> str:
    """The output name of a base weight (PEFT's `X.base_layer.weight` becomes `X.weight`)."""
    return param.replace(".base_layer.", ".")


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


def plan_merge_lora(
    src: str | Path, *, adapter: str | Path | None = None, src_layout: LayoutArg = None,
    src_strategy: str | Path | None = None, dst_layout: LayoutArg = None, dst_strategy: str | Path | None = None,
    lora_scaling: float | None = None, keep_optimizer_states: bool = False, fan_in_fan_out: bool = False,
    prefix: str = "checkpoint_", output_format: str | None = None,
) -> Job:  # fmt: skip
    """Plan the base model, laid out as asked, with every LoRA branch folded into its base weight."""
    check_file_prefix(prefix)
    source = open_source(src)
    adapter_path = Path(adapter) if adapter is not None else None
    adapter_entries: dict[str, TensorEntry] = {}
    if adapter_path is not None:
        file = adapter_path / "adapter_model.safetensors" if adapter_path.is_dir() else adapter_path
        adapter_entries = strip_peft(open_source(file).entries[0])
    scaling = read_scaling(lora_scaling, adapter_path)
    cfg = scaling.config or {}
    fan_in_fan_out = fan_in_fan_out or bool(cfg.get("fan_in_fan_out"))
    src_names = merge_orders([list(source.entries[r]) for r in sorted(source.entries)])
    weights = [n for n in src_names if not n.startswith(OPTIMIZER_PREFIXES)]  # adam_m.X.lora_a is no LoRA pair
    pairs = find_pairs(weights + [n for n in adapter_entries if n not in src_names])
    if not pairs:
        raise PlanError(f"{source.path}{' and ' + str(adapter_path) if adapter_path else ''}: no LoRA factors "
                        "(*.lora_A.weight, *.lora_a, *.mindpet_delta_lora_a) found")
    kept: dict[int, dict[str, TensorEntry]] = {}
    stored: dict[str, str] = {}  # output name -> name in the source (X.weight <- X.base_layer.weight)
    for rank, entries in source.entries.items():
        out: dict[str, TensorEntry] = {}
        for name, entry in entries.items():
            if is_lora(name) or any(name.startswith(p) and is_lora(name[len(p):]) for p in OPTIMIZER_PREFIXES):
                continue
            if not keep_optimizer_states and name.startswith(OPTIMIZER_PREFIXES):
                continue
            new = base_name(name)
            if new in out:
                raise FormatError(f"{entry.path}: both {new!r} and {name!r} are present; which is the base?")
            out[new] = entry
            stored[new] = name
        kept[rank] = out
    src_l, dst_l = native_layouts(source, src_layout, src_strategy, dst_layout, dst_strategy, renamed=stored)
    if src_l is not None:  # the source layout describes the stored names, the destination the output names
        src_l = _StoredNames(src_l, stored)
    fmt = output_format or source.suffix.lstrip(".")
    plan = make_plan(kept, src_l, dst_l, prefix=prefix, suffix="." + fmt)
    factors_in_src = {r: {n: e for n, e in entries.items() if is_lora(n)} for r, entries in source.entries.items()}
    src_factors = make_plan(factors_in_src, src_l, None) if any(factors_in_src.values()) else None
    adapter_factors = make_plan({0: {n: e for n, e in adapter_entries.items() if is_lora(n)}}, None, None) \
        if adapter_entries else None  # fmt: skip
    params = dict(plan.params)
    for module, pair in pairs.items():
        base = module + ".weight"
        if base not in params:
            raise PlanError(f"LoRA pair {pair.a!r} / {pair.b!r} has no base weight {base!r} (nor "
                            f"{module + '.base_layer.weight'!r}) in {source.path}")
        _check_float_base(base, params[base].src_dtype, pair)
        factors = adapter_factors if pair.a in adapter_entries else src_factors
        assert factors is not None  # a pair was found, so the plan of its factors exists
        fold = fold_for(module, pair, params[base].shape, factors, scaling.for_module(module), fan_in_fan_out)
        params[base] = replace(params[base], transforms=(fold, *params[base].transforms))
    return Job(replace(plan, params=params), source, OutputKind(fmt))


def _check_float_base(base: str, dtype: np.dtype, pair) -> None:
    """W + s * B @ A is real-valued: stored into an integer or bool base it would wrap or truncate silently
    (100 + 40 in int8 is -116), and a quantized base needs its scales, which only the quantizer knows."""
    if dtype.kind in "iub" or dtype.name.startswith(("int", "uint")):
        raise PlanError(f"LoRA {pair.a!r} / {pair.b!r}: base weight {base!r} is {dtype.name}, not floating point; "
                        "merging into it would wrap or truncate; dequantize the base to a float type first")


class _StoredNames:
    """A source layout resolved over the names parameters have in the source files."""

    def __init__(self, inner: LayoutLike, stored: dict[str, str]):
        self.inner, self.stored, self.num_ranks = inner, stored, inner.num_ranks

    def resolve(self, params: Iterable[str]) -> dict[str, ParamLayout]:
        names = list(params)
        resolved = self.inner.resolve([self.stored.get(n, n) for n in names])
        return {n: resolved[self.stored.get(n, n)] for n in names}


def adapter_reads(adapter: str | Path | None) -> list[Path]:
    """The paths a merge reads from a separate adapter (its folder or file, weights, config): like the source's,
    they may not lie inside the destination, which `--overwrite` deletes."""
    if adapter is None:
        return []
    path = Path(adapter)
    folder = path if path.is_dir() else path.parent
    return [p for p in (path, folder / "adapter_model.safetensors", folder / "adapter_config.json") if p.exists()]


@remote.views(sources=("src",), destination="dst")
def merge_lora(src: str | Path, dst: str | Path, *, overwrite: bool = False, hf: bool = False,
               max_file_size: str | int | None = None, **options):
    """Library form of `jaxreshard merge-lora` (options as `plan_merge_lora`); returns the write report."""
    job = plan_merge_lora(src, **options)
    check_destination(Path(dst), adapter_reads(options.get("adapter")), overwrite=True)
    return write_job(job, Path(dst), overwrite=overwrite, hf=hf, max_file_bytes=parse_size(max_file_size))
