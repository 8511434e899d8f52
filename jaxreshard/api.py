"""The library entry points: orchestration only (source -> layout sides -> planner -> plan -> write).

The planner is chosen by what the source and the two layout sides are (planners/base.py): a restore-capable
source (orbax) -> `RestorePlanner`; MindSpore strategies with no native layout on either side (and rank-file
output) -> `MindSporePlanner` (`transform_checkpoints` semantics); anything else -> `NativePlanner`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from . import fp8, remote
from .devices import ensure_cpu_devices
from .distributed import cluster_from
from .errors import ConfigError, JaxreshardError
from .formats import SourceCheckpoint, open_source
from .formats.mindspore_ckpt import read_ckpt_index
from .formats.mindspore_strategy import Strategy
from .formats.mindspore_strategy_write import write_merged_strategy_file, write_strategy_file
from .formats.orbax_io import OrbaxSource, is_orbax, read_orbax_metadata
from .formats.writers import OUTPUT_FORMATS, OutputKind
from .fsutil import atomic_output, check_destination, check_file_prefix
from .jobs import ConvertReport, Job, output_of, read_paths, write_job
from .layout import Layout
from .mindspore import strategies_by_stage, uses_by_stage_path
from .plan import LayoutLike, with_dtype
from .planners import FileRequest, MindSporePlanner, NativePlanner, RestorePlanner, Side, one_side, read_side
from .planners.native import native_layouts as native_layouts
from .planners.sides import LayoutArg as LayoutArg
from .planners.sides import as_layout as side_layout
from .rules import Rules
from .run import parse_ranks
from .values import DTYPE_NAMES as DTYPE_NAMES
from .values import parse_dtype as parse_dtype
from .values import parse_size as parse_size
from .verify import VerifyError
from .verify import verify as verify_output  # `convert` has a `verify` flag

log = logging.getLogger(__name__)

TransformArg = str | Path | Rules | Mapping[str, Any] | None


def transform_rules(transform: TransformArg, reverse: bool = False) -> Rules | None:
    """The transform rules of `transform` (a YAML path, a parsed mapping, `Rules`; None: no transform)."""
    if transform is None:
        if reverse:
            raise ConfigError("--reverse runs a --transform backwards; give the transform file too")
        return None
    return Rules.load(transform)


def as_layout(arg: LayoutArg) -> LayoutLike | None:
    """A native layout from a YAML path, a `Layout`, or `(jax Mesh, {name regex: PartitionSpec})`."""
    side = read_side(arg)
    if isinstance(side, Strategy):
        raise ConfigError(f"{arg}: this is a MindSpore strategy; a native layout is needed here")
    return side


def verify_checksums(source: SourceCheckpoint) -> None:
    """Check the `crc_num` trailer of every .ckpt source file (a full read of each; files without one pass)."""
    if source.suffix == ".ckpt":
        for files in source.files.values():
            for path in files:
                read_ckpt_index(path, verify_crc=True)


@remote.views(sources=("src",))
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
    transform: TransformArg = None,
    reverse: bool = False,
    dequantize: bool = False,
) -> Job:
    """Index the source and plan the conversion; reads headers only and writes nothing.

    `src_layout` / `dst_layout`: a layout YAML path, a MindSpore strategy file or folder, a `Layout`, or
    `(mesh, specs)`; `src_strategy` / `dst_strategy` are aliases. With strategies and no native layout the plan
    follows `mindspore.transform_checkpoints` exactly; a strategy beside a native layout mixes them with native
    semantics. `transform` (a rules YAML path, a parsed mapping or `Rules`; `reverse` to run it backwards)
    renames and composes tensors while converting; `dst_layout` speaks of the transformed names and shapes.
    `dequantize` stores block-scaled FP8 weights as `dtype` (default bf16) and drops their scales.
    Returns a `Job`: `job.plan` is the plan, `job.source` the indexed source.
    """
    src_arg, dst_arg = one_side(src_layout, src_strategy, "src"), one_side(dst_layout, dst_strategy, "dst")
    check_file_prefix(prefix)
    rules = transform_rules(transform, reverse)
    if is_orbax(Path(src)):
        if rules is not None:
            raise ConfigError(f"{src}: --transform reads safetensors or .ckpt sources box by box; not orbax")
        job = _restore_job(Path(src), src_arg, dst_arg, prefix, output_format, ranks)
    else:
        job = _files_job(src, src_arg, dst_arg, prefix, output_format, ranks, exact_replicas, verify_crc, rules,
                         reverse)  # fmt: skip
    plan = with_dtype(job.plan, parse_dtype(dtype))
    if dequantize:
        if job.source is None:
            raise ConfigError("--dequantize reads block scales from safetensors or .ckpt files, not an orbax source")
        plan = fp8.dequantize(plan, parse_dtype(dtype or "bf16"), fp8.block_size(job.source.root))
    return Job(plan, job.source, job.kind, job.src_path)


def _restore_job(src: Path, src_arg: Any, dst_arg: Any, prefix: str, output_format: str | None,
                 ranks: Iterable[int] | None) -> Job:  # fmt: skip
    """A source that restores arrays itself (orbax): no source layout; the destination read as a layout."""
    if src_arg is not None:
        raise ConfigError(f"{src}: an orbax checkpoint holds whole arrays; it takes no source layout")
    fmt = output_format or "safetensors"
    dst: Side = read_side(dst_arg)
    # orbax imports JAX, so the fake devices the destination needs must be set up before reading metadata
    ensure_cpu_devices(dst.stage_device_num if isinstance(dst, Strategy) else getattr(dst, "devices_per_stage", 1))
    ndims = {n: len(shape) for n, (shape, _) in read_orbax_metadata(src).items()}
    planner = RestorePlanner(OrbaxSource(src), side_layout(dst, ndims))
    plan = planner.plan(FileRequest(prefix, "." + fmt, ranks))
    return Job(plan, None, OutputKind(fmt), src)


def _files_job(src: str | Path, src_arg: Any, dst_arg: Any, prefix: str, output_format: str | None,
               ranks: Iterable[int] | None, exact_replicas: bool, verify_crc: bool, rules: Rules | None = None,
               reverse: bool = False) -> Job:  # fmt: skip
    """Rank files of any format: the MindSpore planner or the native one, chosen by what the sides are."""
    source = open_source(src)
    if verify_crc:
        verify_checksums(source)
    fmt = output_format or source.suffix.lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"--output-format {fmt!r} is not supported; use one of {', '.join(OUTPUT_FORMATS)}")
    src_side, dst_side = read_side(src_arg), read_side(dst_arg)
    sides = (src_side, dst_side)
    strategies_only = any(isinstance(s, Strategy) for s in sides) and \
        all(s is None or isinstance(s, Strategy) for s in sides)  # fmt: skip
    if strategies_only and fmt != "orbax" and rules is None:  # orbax output holds complete arrays: native semantics
        planner: MindSporePlanner | NativePlanner = MindSporePlanner(source, src_side, dst_side,  # type: ignore[arg-type]
                                                                    exact_replicas=exact_replicas)
    else:
        planner = NativePlanner(source, src_side, dst_side, rules=rules, reverse=reverse)
    plan = planner.plan(FileRequest(prefix, "." + fmt if fmt != "orbax" else "", ranks))
    return Job(plan, source, OutputKind(fmt, planner.flavour))


@remote.views(sources=("src",), destination="dst")
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
    transform: TransformArg = None,
    reverse: bool = False,
    dequantize: bool = False,
) -> ConvertReport:
    """Convert `src` (complete or per-rank) into `dst` laid out by `dst_layout` / `dst_strategy` (none = complete).

    Layouts are YAML paths, `Layout`s, or `(mesh, {name regex: PartitionSpec})`; strategies are MindSpore
    strategy files or directories. Output goes to a temporary sibling of `dst` and is renamed into place when
    complete; an existing non-empty `dst` needs `overwrite`. `ranks` ("0-3,8") writes only those destination
    ranks, each rank folder committed on its own; `process_num` splits the ranks over that many processes.
    `verify` compares the output with the source (`jaxreshard.verify`) before committing it: on a difference
    nothing is committed and `VerifyError` is raised.
    `resume` keeps the verified rank files of an interrupted run of the same conversion and writes the rest.
    `transform` / `reverse`: transform rules applied while converting (see `plan_conversion`).
    """
    wanted = parse_ranks(ranks) if isinstance(ranks, str) or ranks is None else sorted(set(ranks))
    src_arg, dst_arg = one_side(src_layout, src_strategy, "src"), one_side(dst_layout, dst_strategy, "dst")
    job = plan_conversion(src, src_layout=src_arg, dst_layout=dst_arg, prefix=prefix, dtype=dtype,
                          output_format=output_format, exact_replicas=exact_replicas, ranks=wanted,
                          verify_crc=verify_crc, transform=transform, reverse=reverse,
                          dequantize=dequantize)  # fmt: skip
    if verify and transform is not None:
        raise ConfigError("--verify compares tensors by name and shape; it does not apply with --transform")
    if verify and dequantize:
        raise ConfigError("--verify compares the output's bytes with the source's, which --dequantize changes; "
                          "drop one of them")
    if verify and coordinator_address is not None:
        raise ConfigError("--verify runs in one process; verify a multi-host output afterwards with jaxreshard verify")
    check = _output_check(job, src, Path(dst), src_arg, dst_arg, dtype=dtype, ranks=wanted) if verify else None
    return write_job(
        job, Path(dst), overwrite=overwrite, progress=progress, ranks=wanted, process_num=process_num, hf=hf,
        max_file_bytes=parse_size(max_file_size),
        cluster=cluster_from(coordinator_address, num_processes, process_id), before_commit=check, resume=resume,
    )  # fmt: skip


def _output_check(job: Job, src: str | Path, dst: Path, src_arg: Any, dst_arg: Any, *, dtype: str | None,
                  ranks: list[int] | None) -> Callable[[Path], None]:  # fmt: skip
    """`convert --verify`: the check run on the complete temporary output before it is committed."""
    if job.output_format == "orbax" or job.source is None:
        raise ConfigError("--verify compares rank files; it does not apply to orbax sources or outputs")
    if job.mindspore:
        src_s, dst_s = read_side(src_arg), read_side(dst_arg)
        if isinstance(src_s, Strategy) and isinstance(dst_s, Strategy) and uses_by_stage_path(src_s, dst_s):
            raise ConfigError("--verify cannot check MindSpore's by-stage path (one pipeline stage's strategy file "
                              "converted on its own); verify the merged result with jaxreshard verify")

    def check(tmp: Path) -> None:
        try:
            report = verify_output(src, tmp, ranks=ranks, src_layout=src_arg, dst_layout=dst_arg, dtype=dtype)
        except VerifyError as e:  # name the output as the user knows it, not our temporary folder
            message = str(e).replace(str(tmp), str(dst))
            raise VerifyError(f"--verify: nothing was written to {dst}: {message}") from None
        log.info("%s", report.summary().replace(str(tmp), "the output"))

    return check


@remote.views(sources=("src",), destination="out")
def save_strategy(src: str | Path, layout: LayoutArg, out: str | Path, *, overwrite: bool = False) -> list[Path]:
    """MindSpore strategy files for a native layout applied to `src`'s parameters (MindSpore's
    `only_save_strategy` without launching a job): `ckpt_strategy_rank_<r>.ckpt` per global rank (identical
    within a pipeline stage, like a training job's) and `merged_ckpt_strategy.ckpt`."""
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


__all__ = ["convert", "save_strategy", "plan_conversion", "Job", "ConvertReport", "JaxreshardError", "write_job",
           "output_of", "read_paths", "parse_dtype", "parse_size", "native_layouts", "as_layout"]
