"""A planned job and how it is written: the second half of `convert`, shared by merge-lora.

`Job` is what a planner produced (the plan, where it reads, what files it writes); `write_job` runs it into a
destination through run.py (rank files, Hugging Face parts, or one orbax checkpoint), each committed atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from . import manifests
from .distributed import Cluster, owned_ranks
from .distributed import start as start_cluster
from .errors import ConfigError
from .formats import SourceCheckpoint
from .formats.companions import find_companions
from .formats.manifest import MANIFEST_NAME
from .formats.writers import OutputKind
from .fsutil import check_destination
from .plan import Plan, merge_orders
from .planstats import PlanStats, plan_stats
from .progress import Progress
from .run import Output, run_orbax, run_plan


@dataclass(frozen=True)
class Job:
    """A planned conversion: the plan, its source, and what files it writes.

    `source` is the indexed rank-file source; `None` for sources that restore arrays themselves (orbax),
    whose folder is `src_path`.
    """

    plan: Plan
    source: SourceCheckpoint | None
    kind: OutputKind
    src_path: Path | None = None

    @property
    def output_format(self) -> str:
        return self.kind.format

    @property
    def mindspore(self) -> bool:
        """MindSpore strategies on both sides: transform_checkpoints semantics and file flavour."""
        return self.kind.flavour == "mindspore"

    @property
    def path(self) -> Path:
        """The source as the user named it."""
        return Path(self.source.path) if self.source is not None else Path(self.src_path or "")


@dataclass(frozen=True)
class ConvertReport:
    dst: Path
    files: tuple[Path, ...]
    stats: PlanStats
    seconds: float


def write_job(
    job: Job, dst: Path, *, overwrite: bool = False, progress: bool = False, ranks: list[int] | None = None,
    process_num: int = 1, hf: bool = False, max_file_bytes: int | None = None, cluster: Cluster | None = None,
    resume: bool = False, before_commit: Callable[[Path], None] | None = None,
) -> ConvertReport:  # fmt: skip
    """Write a planned job; the output gets its manifest (see manifests.py), and `before_commit(tmp)` runs on
    the complete output before it is committed."""
    start = time.perf_counter()
    wanted = ranks
    if cluster is not None:
        n = max((i.dst_layout.devices_per_stage for i in job.plan.params.values()), default=1)
        local = start_cluster(cluster, n)
        mine = set(owned_ranks([r.dst_rank for r in job.plan.ranks], n, local, cluster.process_id))
        job = replace(job, plan=replace(job.plan, ranks=tuple(r for r in job.plan.ranks if r.dst_rank in mine)))
        wanted = sorted(mine)
    check_destination(dst, read_paths(job), overwrite=overwrite or wanted is not None)
    stats = plan_stats(job.plan)
    if job.output_format == "orbax":
        if wanted is not None or process_num != 1 or hf:
            raise ConfigError("--output-format orbax writes one orbax checkpoint in one process: no --ranks, "
                              "--process-num or --hf")
        run_orbax(job.plan, dst, overwrite=overwrite)
        files = tuple(sorted(p for p in dst.rglob("*") if p.is_file()))
        return ConvertReport(dst, files, stats, time.perf_counter() - start)
    if hf and (len(job.plan.ranks) != 1 or job.output_format != "safetensors" or wanted is not None):
        raise ConfigError("--hf writes one complete safetensors checkpoint; it cannot be combined with a "
                          "destination layout or strategy, --ranks, or --output-format ckpt")
    fmt = "hf" if hf else job.output_format
    source = str(job.path.absolute())
    counts = dict(params=len(job.plan.params), ranks=len(job.plan.ranks))
    with Progress(stats.write_bytes, enabled=progress, **counts) as bar:
        run_plan(job.plan, dst, output_of(job, hf, max_file_bytes), overwrite=overwrite,
                 some_ranks=wanted is not None, process_num=process_num, on_bytes=bar.update,
                 before_commit=before_commit, resume_run=resume,
                 describe=lambda files: manifests.build_manifest(job.plan, source, fmt, files))
    return ConvertReport(dst, tuple(_written(job, dst, hf)), stats, time.perf_counter() - start)


def _written(job: Job, dst: Path, hf: bool) -> list[Path]:
    folders = {r.dst_file.split("/")[0] for r in job.plan.ranks} if not hf else \
        {p.name for p in dst.iterdir() if p.name != MANIFEST_NAME}  # fmt: skip
    return sorted(p for f in folders for p in ([dst / f] if (dst / f).is_file() else (dst / f).rglob("*"))
                  if p.is_file())


def read_paths(job_or_source: Job | SourceCheckpoint) -> list[Path]:
    """Every path a conversion reads (its folder, its files, each tensor's file), for the overlap check: a rank
    folder or part file that is a symlink into the destination must be refused."""
    source = job_or_source.source if isinstance(job_or_source, Job) else job_or_source
    if source is None:  # a restore-capable source: its folder
        return [job_or_source.path]  # type: ignore[union-attr]
    paths = {source.path, source.root, *(p for files in source.files.values() for p in files)}
    paths.update(e.path for entries in source.entries.values() for e in entries.values())
    return sorted(paths)


def output_of(job: Job, hf: bool = False, max_file_bytes: int | None = None) -> Output:
    """How `write_job` writes a job's files: kind, the source metadata they carry, the layout's ranks."""
    carried = {} if job.mindspore or job.source is None else \
        manifests.carried_metadata(manifests.source_metadata(job.source))  # fmt: skip
    if job.source is not None and not job.mindspore:
        carried = manifests.with_order(carried, job.plan, merge_orders([list(e) for _, e in sorted(
            job.source.entries.items())]))  # fmt: skip
    carried = manifests.hf_metadata(carried) if hf else carried
    companions = find_companions(job.source.root) if job.source is not None else ()
    return Output(job.kind, hf, max_file_bytes, tuple(carried.items()), manifests.layout_num_ranks(job.plan),
                  companions)
