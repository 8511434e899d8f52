"""The library entry points: orchestration only (open source -> layouts -> plan -> execute -> commit)."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, JaxreshardError
from .execute import execute
from .formats import SourceCheckpoint, open_source
from .formats.safetensors_io import HF_INDEX, SafetensorsWriter, split_into_files
from .fsutil import atomic_output, check_destination
from .layout import Layout, layout_from_mesh, read_layout
from .plan import LayoutLike, Plan, PlanStats, make_plan, plan_stats

log = logging.getLogger(__name__)

LayoutArg = LayoutLike | str | Path | tuple[Any, Mapping[str, Any]] | None

DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "f64": "float64",
}  # fmt: skip


def as_layout(arg: LayoutArg) -> LayoutLike | None:
    """A layout from a file path, a `Layout`, or a `(jax Mesh, {name regex: PartitionSpec})` pair."""
    if arg is None or isinstance(arg, Layout):
        return arg
    if isinstance(arg, (str, Path)):
        return read_layout(arg)
    if isinstance(arg, tuple) and len(arg) == 2:
        return layout_from_mesh(arg[0], arg[1])
    if hasattr(arg, "resolve") and hasattr(arg, "num_ranks"):
        return arg  # type: ignore[return-value]
    raise ConfigError(f"cannot use {arg!r} as a layout: give a YAML path, a Layout, or (mesh, specs)")


def parse_dtype(name: str | None) -> np.dtype | None:
    if name is None:
        return None
    import ml_dtypes

    canonical = DTYPE_NAMES.get(str(name).lower())
    if canonical is None:
        raise ConfigError(f"--dtype {name!r} is not a floating type; use one of {sorted(set(DTYPE_NAMES.values()))}")
    return np.dtype(ml_dtypes.bfloat16) if canonical == "bfloat16" else np.dtype(canonical)


def parse_size(text: str | int | None) -> int | None:
    """'5GB' / '500MiB' / 1000 -> bytes (decimal units for KB/MB/GB like huggingface_hub, binary for KiB...)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"size {text!r} is not understood; write e.g. 5GB, 500MiB or 1000000")
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(float(m.group(1)) * scale[unit])


def plan_conversion(
    src: str | Path,
    *,
    src_layout: LayoutArg = None,
    dst_layout: LayoutArg = None,
    prefix: str = "checkpoint_",
    dtype: str | None = None,
    ranks: Iterable[int] | None = None,
) -> tuple[Plan, SourceCheckpoint]:
    """Index the source and plan the conversion; reads headers only and writes nothing."""
    source = open_source(src)
    src_l, dst_l = as_layout(src_layout), as_layout(dst_layout)
    if source.distributed and src_l is None:
        raise ConfigError(
            f"{source.path}: this is a distributed checkpoint ({len(source.entries)} rank folders); pass the "
            "layout it was saved with as --src-layout"
        )
    plan = make_plan(
        source.entries, src_l, dst_l, prefix=prefix, suffix=".safetensors", dst_dtype=parse_dtype(dtype),
        dst_ranks=ranks,
    )  # fmt: skip
    return plan, source


@dataclass(frozen=True)
class ConvertReport:
    dst: Path
    files: tuple[Path, ...]
    stats: PlanStats
    seconds: float


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    src_layout: LayoutArg = None,
    dst_layout: LayoutArg = None,
    prefix: str = "checkpoint_",
    dtype: str | None = None,
    hf: bool = False,
    max_file_size: str | int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ConvertReport:
    """Convert `src` (complete or per-rank) into `dst` laid out by `dst_layout` (None = complete).

    Layouts are YAML paths, `Layout`s, or `(mesh, {name regex: PartitionSpec})`. Output goes to a temporary
    sibling of `dst` and is renamed into place when complete; an existing non-empty `dst` needs `overwrite`.
    """
    start = time.perf_counter()
    dst = Path(dst)
    plan, source = plan_conversion(src, src_layout=src_layout, dst_layout=dst_layout, prefix=prefix, dtype=dtype)
    check_destination(dst, [source.path], overwrite=overwrite)
    if hf and len(plan.ranks) != 1:
        raise ConfigError("--hf writes a complete Hugging Face checkpoint; it cannot be combined with --dst-layout")
    max_file_bytes = parse_size(max_file_size)
    stats = plan_stats(plan)
    from .progress import Progress

    with atomic_output(dst, overwrite=overwrite) as tmp, Progress(stats.write_bytes, enabled=progress) as bar:
        if hf:
            writer_factory = lambda path, params: HfWriter(tmp, params, max_file_bytes)  # noqa: E731
        else:
            writer_factory = lambda path, params: SafetensorsWriter(path, params)  # noqa: E731
        execute(plan, tmp, writer_factory, on_bytes=bar.update)
        files = tuple(sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file()))
    return ConvertReport(dst, tuple(dst / f for f in files), stats, time.perf_counter() - start)


class HfWriter:
    """A complete checkpoint as `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.

    File boundaries are fixed up front from the sizes (no renames at the end); the index is written last,
    after every part is complete, so a reader never sees an index pointing at a missing part.
    """

    def __init__(self, dst_dir: Path, params: list[tuple[str, np.dtype, tuple[int, ...]]], max_file_bytes: int | None):
        sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for _, dt, shape in params]
        groups = split_into_files(sizes, max_file_bytes)
        self._dst_dir = dst_dir
        self._total = sum(sizes)
        self._writers: list[SafetensorsWriter] = []
        self._file_of: dict[str, int] = {}
        n = len(groups)
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._writers.append(SafetensorsWriter(dst_dir / name, [params[j] for j in group]))
            for j in group:
                self._file_of[params[j][0]] = i

    def write(self, param: str, array: np.ndarray) -> None:
        self._writers[self._file_of[param]].write(param, array)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        weight_map = {p: self._writers[i].path.name for p, i in self._file_of.items()}
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        (self._dst_dir / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["convert", "plan_conversion", "ConvertReport", "JaxreshardError"]
