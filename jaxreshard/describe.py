"""Text renderings for people: the dry-run plan (`jaxreshard plan`) and a checkpoint's contents (`inspect`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from . import fill
from .composed import Composed
from .formats import SourceCheckpoint, iopool
from .formats.orbax_io import read_orbax_metadata
from .layout import format_spec
from .mindspore import param_layout
from .plan import LayoutLike, Plan, format_ranks, make_plan
from .planstats import RankStats, plan_stats

log = logging.getLogger(__name__)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


LISTED_RANKS = 16  # plans with more destination ranks list ranks with equal numbers as one line
LISTED_GROUPS = 32  # ... and at most this many such lines
LISTED_FILES = 8  # a rank reading more source files names the first and last of them only


def describe_plan(plan: Plan) -> Iterator[str]:
    """Per destination rank: file, source files, parameters, bytes to read and write; then totals.

    A plan of more than `LISTED_RANKS` ranks (a 1024-rank layout of a 90k-tensor model) is summarised: ranks
    with the same numbers and source files share one line, so the output stays a screenful; `--ranks` lists
    chosen ranks one by one."""
    stats = plan_stats(plan)
    yield f"{len(stats.ranks)} destination rank(s), {len(plan.params)} parameter(s)"
    if len(stats.ranks) <= LISTED_RANKS:
        for rank in stats.ranks:
            yield (
                f"rank {rank.dst_rank}: {rank.dst_file}  params {rank.params}  read {human_bytes(rank.read_bytes)}  "
                f"write {human_bytes(rank.write_bytes)}"
            )
            yield from _source_files(rank.src_files)
    else:
        yield from _rank_groups(stats.ranks)
    yield f"total: read {human_bytes(stats.read_bytes)} once, write {human_bytes(stats.write_bytes)}"
    composed = [i.source for i in plan.params.values() if isinstance(i.source, Composed)]
    if composed:
        sources = {part.src_param for c in composed for part in c.parts}
        yield (f"transform: {len(composed)} parameter(s) composed of {len(sources)} source tensor(s), each box "
               "reading only its pieces")
    yield (
        f"predicted peak tensor memory: {human_bytes(stats.peak_buffer_bytes)} "
        f"(largest parameter in flight: {stats.peak_param or '-'})"
    )
    yield host_memory_line(stats.peak_buffer_bytes, available_memory())


# --- host memory (the local I/O engine's slice of issue 12; kept apart from the plan rendering above) ---

def io_buffer_bytes() -> int:
    """Memory the I/O engine may hold beside the tensors: writes queued behind, and the read slabs."""
    return iopool.pool("write").max_bytes + fill.PIPELINE_DEPTH * fill.SLAB_BYTES


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's `MemAvailable` in bytes (what the kernel can give without swapping), None where unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_memory_line(tensor_bytes: int, available: int | None) -> str:
    """The run's predicted peak (tensors + I/O buffers) next to the host's `available` memory; one warning
    (not an error: the estimate is not exact, and memory may be freed by then) when it would not fit."""
    peak = tensor_bytes + io_buffer_bytes()
    line = f"host memory: predicted peak {human_bytes(peak)} (tensors + I/O buffers), "
    if available is None:
        return line + "available memory unknown (no /proc/meminfo MemAvailable)"
    if peak > available:
        log.warning("the predicted peak memory %s exceeds this host's available memory %s (MemAvailable): the run "
                    "may swap or be killed; free memory or convert on a larger host", human_bytes(peak),
                    human_bytes(available))
    return line + f"available {human_bytes(available)} ({'fits' if peak <= available else 'DOES NOT FIT'})"


def _source_files(files: tuple[str, ...]) -> Iterator[str]:
    if len(files) <= LISTED_FILES:
        yield from (f"    from {src}" for src in files)
    else:
        yield f"    from {len(files)} source files: {files[0]} ... {files[-1]}"


def _rank_groups(ranks: tuple[RankStats, ...]) -> Iterator[str]:
    """One line per set of ranks with equal parameters, bytes and source files (data-parallel replicas)."""
    groups: dict[tuple[int, int, int, tuple[str, ...]], list[RankStats]] = {}
    for rank in ranks:
        groups.setdefault((rank.params, rank.read_bytes, rank.write_bytes, rank.src_files), []).append(rank)
    for (params, read, write, files), members in list(groups.items())[:LISTED_GROUPS]:
        numbers = [r.dst_rank for r in members]
        yield (f"ranks {format_ranks(numbers)} ({len(numbers)} rank(s), e.g. {members[0].dst_file}): params {params}  "
               f"read {human_bytes(read)}  write {human_bytes(write)} each")
        yield from _source_files(files)
    if len(groups) > LISTED_GROUPS:
        rest = sum(len(m) for m in list(groups.values())[LISTED_GROUPS:])
        yield f"... {len(groups) - LISTED_GROUPS} more group(s) of {rest} rank(s); list some with --ranks"


def describe_source(source: SourceCheckpoint, src_layout: LayoutLike | None) -> Iterator[str]:
    """Parameters with shape, dtype and bytes; with a layout, the full shape and each rank's block."""
    kind = "distributed" if source.distributed else "complete"
    yield f"{source.path}: {kind} {source.suffix} checkpoint, {len(source.entries)} rank file(s)"
    if src_layout is None:
        for rank in source.ranks:
            files = ", ".join(str(p) for p in source.files[rank])
            yield f"rank {rank}: {files}"
            for entry in source.entries[rank].values():
                shape = f"{list(entry.shape)!s:<18}"
                yield f"    {entry.param:<48} {str(entry.dtype):<9} {shape} {human_bytes(entry.nbytes)}"
        return
    plan = make_plan(source.entries, src_layout, None)  # validates the layout against the files
    total = 0
    for info in plan.params.values():
        nbytes = info.src_dtype.itemsize * _prod(info.shape)
        total += nbytes
        layout = info.src_layout
        yield (
            f"{info.param:<48} {str(info.src_dtype):<9} {list(info.shape)!s:<18} {human_bytes(nbytes):>11}  "
            f"spec {format_spec(layout.spec)} stages {list(layout.stages)}"
        )
        boxes: dict[str, list[int]] = {}
        for rank in layout.global_ranks():
            boxes.setdefault(str(layout.box(info.shape, rank % layout.devices_per_stage)), []).append(rank)
        if len(boxes) > 1 or len(layout.global_ranks()) > 1:
            yield "    " + "  ".join(f"{box} on ranks {format_ranks(ranks)}" for box, ranks in boxes.items())
    yield f"total: {len(plan.params)} parameters, {human_bytes(total)}"


def describe_orbax(path: Path) -> Iterator[str]:
    """An orbax checkpoint: its arrays (complete, as orbax stores them) with dtype, shape and bytes."""
    params = read_orbax_metadata(path)
    yield f"{path}: orbax checkpoint, {len(params)} array(s)"
    total = 0
    for name, (shape, dtype) in params.items():
        nbytes = dtype.itemsize * _prod(shape)
        total += nbytes
        yield f"    {name:<48} {str(dtype):<9} {list(shape)!s:<18} {human_bytes(nbytes)}"
    yield f"total: {len(params)} arrays, {human_bytes(total)}"


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def describe_strategy(strategy) -> Iterator[str]:
    """A MindSpore strategy file: per parameter, its layout as mesh axes + PartitionSpec and its stages."""
    yield (f"{strategy.source}: MindSpore strategy, {len(strategy.params)} parameters, {strategy.stage_num} "
           f"stage(s) x {strategy.stage_device_num} devices")
    for name, p in strategy.params.items():
        layout = param_layout(name, p, len(p.tensor_map), p.stages, strategy.source)
        mesh = "{" + ", ".join(f"{a}: {n}" for a, n in layout.mesh_axes) + "}"
        opt = f" opt_shard {p.opt_shard_step}/{p.opt_shard_size}" if p.opt_shard_step else ""
        yield (f"{name:<48} dev_matrix {list(p.dev_matrix)} tensor_map {list(p.tensor_map)}{opt}  ->  mesh {mesh} "
               f"spec {format_spec(layout.spec)} stages {list(p.stages)}")
