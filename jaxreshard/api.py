"""The library entry points: orchestration only (open source -> layouts -> plan -> execute -> commit)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .distributed import Cluster, cluster_from, owned_ranks
from .distributed import start as start_cluster
from .errors import ConfigError, JaxreshardError
from .formats import SourceCheckpoint, open_source
from .formats.manifest import MANIFEST_NAME
from .formats.writers import OUTPUT_FORMATS
from .fsutil import atomic_output, check_destination, check_file_prefix
from .layout import Layout, layout_from_mesh, read_layout
from .plan import LayoutLike, Plan, PlanStats, make_plan, plan_stats, with_dtype
from .run import Output, parse_ranks, run_plan

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


def _one_per_side(src_layout: Any, src_strategy: Any, dst_layout: Any, dst_strategy: Any) -> None:
    for side, layout, strategy in (("src", src_layout, src_strategy), ("dst", dst_layout, dst_strategy)):
        if layout is not None and strategy is not None:
            raise ConfigError(f"give --{side}-layout or --{side}-strategy, not both")


def native_layouts(
    source: SourceCheckpoint, src_layout: LayoutArg, src_strategy: Any, dst_layout: LayoutArg = None,
    dst_strategy: Any = None, *, renamed: Mapping[str, str] | None = None,
) -> tuple[LayoutLike | None, LayoutLike | None]:  # fmt: skip
    """Source and destination layouts with native semantics, each from a layout (path/object) or a MindSpore
    strategy (path or an already read `Strategy`); `renamed` adds output names (new -> stored) whose tensor
    rank is the stored parameter's."""
    from .formats.mindspore_strategy import Strategy, read_strategy
    from .mindspore import StrategyLayout

    _one_per_side(src_layout, src_strategy, dst_layout, dst_strategy)
    ndims = {p: len(shape) for p, shape in source.shapes.items()}
    ndims.update({new: ndims[old] for new, old in (renamed or {}).items() if old in ndims})

    def one(layout: LayoutArg, strategy: Any) -> LayoutLike | None:
        if strategy is None:
            return as_layout(layout)
        return StrategyLayout(strategy if isinstance(strategy, Strategy) else read_strategy(Path(strategy)), ndims)

    from .srccheck import source_layout

    src_l, dst_l = source_layout(source, one(src_layout, src_strategy)), one(dst_layout, dst_strategy)
    if source.distributed and src_l is None:
        raise ConfigError(
            f"{source.path}: this is a distributed checkpoint ({len(source.entries)} rank folders); pass the "
            "layout it was saved with (--src-layout / src_layout=, or --src-strategy / src_strategy=)"
        )
    return src_l, dst_l


def verify_checksums(source: SourceCheckpoint) -> None:
    """Check the `crc_num` trailer of every .ckpt source file (a full read of each; files without one pass)."""
    from .formats.mindspore_ckpt import read_ckpt_index

    if source.suffix == ".ckpt":
        for files in source.files.values():
            for path in files:
                read_ckpt_index(path, verify_crc=True)


@dataclass(frozen=True)
class Job:
    """A planned conversion: the plan, its source, and how the output is written."""

    plan: Plan
    source: SourceCheckpoint
    output_format: str  # "safetensors" or "ckpt"
    mindspore: bool  # MindSpore strategies on both sides: transform_checkpoints semantics and file flavour


def plan_conversion(
    src: str | Path,
    *,
    src_layout: LayoutArg = None,
    dst_layout: LayoutArg = None,
    src_strategy: str | Path | None = None,
    dst_strategy: str | Path | None = None,
    prefix: str = "checkpoint_",
    dtype: str | None = None,
    output_format: str | None = None,
    ranks: Iterable[int] | None = None,
    exact_replicas: bool = False,
    verify_crc: bool = False,
) -> Job:
    """Index the source and plan the conversion; reads headers only and writes nothing.

    With MindSpore strategies (and no native layouts) the plan follows `mindspore.transform_checkpoints`
    exactly; a strategy on one side and a native layout on the other mixes them with native semantics.
    """
    from .formats.mindspore_strategy import read_strategy
    from .mindspore import StrategyLayout, plan_mindspore

    _one_per_side(src_layout, src_strategy, dst_layout, dst_strategy)
    check_file_prefix(prefix)
    from .formats.orbax_io import is_orbax, read_orbax_metadata
    from .orbax_restore import plan_orbax_source

    if is_orbax(Path(src)):
        if src_layout is not None or src_strategy is not None:
            raise ConfigError(f"{src}: an orbax checkpoint holds whole arrays; it takes no source layout")
        fmt = output_format or "safetensors"
        dst_s = read_strategy(Path(dst_strategy)) if dst_strategy else None
        from .execute import ensure_cpu_devices

        # orbax imports JAX, so the fake devices the destination needs must be set up before reading metadata
        ensure_cpu_devices(dst_s.stage_device_num if dst_s else getattr(as_layout(dst_layout), "devices_per_stage", 1))
        ndims = {n: len(shape) for n, (shape, _) in read_orbax_metadata(Path(src)).items()}
        dst_l = StrategyLayout(dst_s, ndims) if dst_s else as_layout(dst_layout)
        plan = plan_orbax_source(Path(src), dst_l, prefix=prefix, suffix="." + fmt, dst_ranks=ranks)
        source = SourceCheckpoint(Path(src), ".orbax", False, {}, {})
        return Job(with_dtype(plan, parse_dtype(dtype)), source, fmt, False)
    source = open_source(src)
    if verify_crc:
        verify_checksums(source)
    fmt = output_format or source.suffix.lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"--output-format {fmt!r} is not supported; use one of {', '.join(OUTPUT_FORMATS)}")
    src_s = read_strategy(Path(src_strategy)) if src_strategy is not None else None
    dst_s = read_strategy(Path(dst_strategy)) if dst_strategy is not None else None
    mindspore = (src_s is not None or dst_s is not None) and src_layout is None and dst_layout is None \
        and fmt != "orbax"  # orbax output holds complete arrays: native semantics
    if mindspore:
        from .srccheck import check_given_layout, source_manifest

        manifest = source_manifest(source)  # sizes checked on every read; a given strategy checked against it
        if src_s is not None:
            ndims = {p: len(shape) for p, shape in source.shapes.items()}
            check_given_layout(source, StrategyLayout(src_s, ndims), manifest)
        plan = plan_mindspore(source, src_s, dst_s, prefix=prefix, suffix="." + fmt, dst_ranks=ranks,
                              exact_replicas=exact_replicas)
    else:
        src_l, dst_l = native_layouts(source, src_layout, src_s, dst_layout, dst_s)
        plan = make_plan(source.entries, src_l, dst_l, prefix=prefix, suffix="." + fmt if fmt != "orbax" else "",
                         dst_ranks=ranks)
        extras = source.extras.get(min(source.entries), {})
        if extras:  # text entries go to every rank, as MindSpore's pass-through does
            plan = replace(plan, ranks=tuple(replace(r, extras=tuple(extras.items())) for r in plan.ranks))
    return Job(with_dtype(plan, parse_dtype(dtype)), source, fmt, mindspore)


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
    src_strategy: str | Path | None = None,
    dst_strategy: str | Path | None = None,
    prefix: str = "checkpoint_",
    dtype: str | None = None,
    output_format: str | None = None,
    hf: bool = False,
    max_file_size: str | int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    exact_replicas: bool = False,
    ranks: str | Iterable[int] | None = None,
    process_num: int = 1,
    verify_crc: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    verify: bool = False,
    resume: bool = False,
) -> ConvertReport:
    """Convert `src` (complete or per-rank) into `dst` laid out by `dst_layout` / `dst_strategy` (none = complete).

    Layouts are YAML paths, `Layout`s, or `(mesh, {name regex: PartitionSpec})`; strategies are MindSpore
    strategy files or directories. Output goes to a temporary sibling of `dst` and is renamed into place when
    complete; an existing non-empty `dst` needs `overwrite`. `ranks` ("0-3,8") writes only those destination
    ranks, each rank folder committed on its own; `process_num` splits the ranks over that many processes.
    `verify` compares the output with the source (`jaxreshard.verify`) before committing it: on a difference
    nothing is committed and `VerifyError` is raised.
    `resume` keeps the verified rank files of an interrupted run of the same conversion and writes the rest.
    """
    wanted = parse_ranks(ranks) if isinstance(ranks, str) or ranks is None else sorted(set(ranks))
    job = plan_conversion(
        src, src_layout=src_layout, dst_layout=dst_layout, src_strategy=src_strategy, dst_strategy=dst_strategy,
        prefix=prefix, dtype=dtype, output_format=output_format, exact_replicas=exact_replicas, ranks=wanted,
        verify_crc=verify_crc,
    )  # fmt: skip
    check = None
    if verify and coordinator_address is not None:
        raise ConfigError("--verify runs in one process; verify a multi-host output afterwards with jaxreshard verify")
    if verify:
        check = _output_check(job, src, Path(dst), src_layout=src_layout, src_strategy=src_strategy,
                              dst_layout=dst_layout, dst_strategy=dst_strategy, dtype=dtype, ranks=wanted)
    return write_job(
        job, Path(dst), overwrite=overwrite, progress=progress, ranks=wanted, process_num=process_num, hf=hf,
        max_file_bytes=parse_size(max_file_size),
        cluster=cluster_from(coordinator_address, num_processes, process_id), before_commit=check, resume=resume,
    )  # fmt: skip


def _output_check(job: Job, src: str | Path, dst: Path, *, ranks: list[int] | None, **layouts: Any):
    """`convert --verify`: the check run on the complete temporary output before it is committed."""
    if job.output_format == "orbax" or job.source.suffix == ".orbax":
        raise ConfigError("--verify compares rank files; it does not apply to orbax sources or outputs")
    if job.mindspore and layouts["src_strategy"] and layouts["dst_strategy"]:
        from .formats.mindspore_strategy import read_strategy
        from .mindspore import uses_by_stage_path

        src_s, dst_s = (read_strategy(Path(layouts[k])) for k in ("src_strategy", "dst_strategy"))
        if uses_by_stage_path(src_s, dst_s):
            raise ConfigError("--verify cannot check MindSpore's by-stage path (one pipeline stage's strategy file "
                              "converted on its own); verify the merged result with jaxreshard verify")

    def check(tmp: Path) -> None:
        from .verify import VerifyError, verify

        try:
            report = verify(src, tmp, ranks=ranks, **layouts)
        except VerifyError as e:  # name the output as the user knows it, not our temporary folder
            message = str(e).replace(str(tmp), str(dst))
            raise VerifyError(f"--verify: nothing was written to {dst}: {message}") from None
        log.info("%s", report.summary().replace(str(tmp), "the output"))

    return check


def write_job(
    job: Job, dst: Path, *, overwrite: bool = False, progress: bool = False, ranks: list[int] | None = None,
    process_num: int = 1, hf: bool = False, max_file_bytes: int | None = None, cluster: Cluster | None = None,
    resume: bool = False, before_commit: Callable[[Path], None] | None = None,
) -> ConvertReport:  # fmt: skip
    """Write a planned job (the second half of `convert`, shared by merge-lora); the output gets its manifest
    (see manifests.py), and `before_commit(tmp)` runs on the complete output before it is committed."""
    start = time.perf_counter()
    wanted = ranks
    if cluster is not None:
        n = max((i.dst_layout.devices_per_stage for i in job.plan.params.values()), default=1)
        local = start_cluster(cluster, n)
        mine = set(owned_ranks([r.dst_rank for r in job.plan.ranks], n, local, cluster.process_id))
        job = replace(job, plan=replace(job.plan, ranks=tuple(r for r in job.plan.ranks if r.dst_rank in mine)))
        wanted = sorted(mine)
    check_destination(dst, read_paths(job.source), overwrite=overwrite or wanted is not None)
    if job.output_format == "orbax":
        if wanted is not None or process_num != 1 or hf:
            raise ConfigError("--output-format orbax writes one orbax checkpoint in one process: no --ranks, "
                              "--process-num or --hf")
        from .orbax_restore import write_orbax

        write_orbax(job.plan, dst, overwrite=overwrite)
        stats = plan_stats(job.plan)
        files = tuple(sorted(p for p in dst.rglob("*") if p.is_file()))
        return ConvertReport(dst, files, stats, time.perf_counter() - start)
    if hf and (len(job.plan.ranks) != 1 or job.output_format != "safetensors" or wanted is not None):
        raise ConfigError("--hf writes one complete safetensors checkpoint; it cannot be combined with a "
                          "destination layout or strategy, --ranks, or --output-format ckpt")
    stats = plan_stats(job.plan)
    from . import manifests

    output = output_of(job, hf, max_file_bytes)
    fmt = "hf" if hf else job.output_format
    source = str(Path(job.source.path).absolute())
    from .progress import Progress

    counts = dict(params=len(job.plan.params), ranks=len(job.plan.ranks))
    with Progress(stats.write_bytes, enabled=progress, **counts) as bar:
        run_plan(job.plan, dst, output, overwrite=overwrite, some_ranks=wanted is not None,
                 process_num=process_num, on_bytes=bar.update, before_commit=before_commit, resume_run=resume,
                 describe=lambda files: manifests.build_manifest(job.plan, source, fmt, files))
    folders = {r.dst_file.split("/")[0] for r in job.plan.ranks} if not hf else \
        {p.name for p in dst.iterdir() if p.name != MANIFEST_NAME}  # fmt: skip
    files = sorted(p for f in folders for p in ([dst / f] if (dst / f).is_file() else (dst / f).rglob("*"))
                   if p.is_file())
    return ConvertReport(dst, tuple(files), stats, time.perf_counter() - start)


def read_paths(source: SourceCheckpoint) -> list[Path]:
    """Every path a conversion of `source` reads (its folder, its files, each tensor's file), for the overlap
    check: a rank folder or part file that is a symlink into the destination must be refused."""
    paths = {source.path, *(p for files in source.files.values() for p in files)}
    paths.update(e.path for entries in source.entries.values() for e in entries.values())
    return sorted(paths)


def output_of(job: Job, hf: bool = False, max_file_bytes: int | None = None) -> Output:
    """How `write_job` writes a job's files: format, flavour, the source metadata they carry, the layout's ranks."""
    from . import manifests

    carried = {} if job.mindspore else manifests.carried_metadata(manifests.source_metadata(job.source))
    carried = manifests.hf_metadata(carried) if hf else carried
    return Output(job.output_format, hf, max_file_bytes, job.mindspore, tuple(carried.items()),
                  manifests.layout_num_ranks(job.plan))


def save_strategy(src: str | Path, layout: LayoutArg, out: str | Path, *, overwrite: bool = False) -> list[Path]:
    """MindSpore strategy files for a native layout applied to `src`'s parameters (MindSpore's
    `only_save_strategy` without launching a job): `ckpt_strategy_rank_<r>.ckpt` per global rank (identical
    within a pipeline stage, like a training job's) and `merged_ckpt_strategy.ckpt`."""
    from .formats.mindspore_strategy_write import write_merged_strategy_file, write_strategy_file
    from .mindspore import strategies_by_stage

    native = as_layout(layout)
    if not isinstance(native, Layout):
        raise ConfigError("--layout must be a native layout (YAML file, Layout, or (mesh, specs))")
    source = open_source(src)
    shapes = source.shapes
    stages = strategies_by_stage(native.resolve(list(shapes)), shapes, native.pipeline_stages)
    out = Path(out)
    check_destination(out, read_paths(source), overwrite=overwrite)
    with atomic_output(out, overwrite=overwrite) as tmp:
        for rank in range(native.num_ranks):
            write_strategy_file(tmp / f"ckpt_strategy_rank_{rank}.ckpt", stages[rank // native.devices_per_stage],
                                rank // native.devices_per_stage)
        write_merged_strategy_file(tmp / "merged_ckpt_strategy.ckpt", stages)
    return sorted(out.iterdir())


__all__ = ["convert", "save_strategy", "plan_conversion", "Job", "ConvertReport", "JaxreshardError"]
