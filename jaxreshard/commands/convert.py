"""`jaxreshard convert` and `jaxreshard plan` (the same options: a dry run is the same command line).

A command is one module like this one: an options dataclass (its fields are the flags and the job-file keys),
a handler taking those options and returning the exit code, and a `Command` naming both, added with one line to
`COMMANDS` in `jaxreshard/commands/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import api, describe, remote
from ..plan import gc_paused
from . import common
from .options import PROCESS_COUNT, PROCESS_INDEX, Command, flag, option, parse_rank_list


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanOptions:
    src: str = common.src()
    dst: str | None = common.dst(default=None)
    src_layout: str | None = common.src_layout()
    dst_layout: str | None = common.dst_layout()
    src_strategy: str | None = common.src_strategy()
    dst_strategy: str | None = common.dst_strategy()
    output_format: str | None = common.output_format()
    prefix: str = common.prefix()
    dtype: str | None = option("cast floating-point tensors to this dtype (bf16, fp16, fp32, fp64); default: copy "
                               "bytes", default=None)
    dequantize: bool = flag("store block-scaled FP8 weights as --dtype (default bf16), float32(w) * scale per "
                            "block, and drop their <name>_scale_inv tensors")
    hf: bool = common.hf()
    max_file_size: int | None = common.max_file_size()
    ranks: tuple[int, ...] | None = option("write only these destination ranks, e.g. 0-3,8 (each node its own "
                                           "share)", parse_rank_list, None)
    workers: int = common.workers()
    coordinator_address: str | None = option("multi-host: host:port of process 0 (jax.distributed)", default=None)
    num_processes: int | None = option("multi-host: number of processes in the jax.distributed job",
                                       PROCESS_COUNT, None, metavar="N")
    process_id: int | None = option("multi-host: this process's index in the jax.distributed job",
                                    PROCESS_INDEX, None, metavar="I")
    overwrite: bool = common.overwrite()
    verify_crc: bool = flag("check the crc_num trailer of MindSpore .ckpt sources before converting")
    exact_replicas: bool = flag("read every block from the replica MindSpore would (only matters when "
                                "data-parallel copies differ); default: each block read once")
    verify: bool = flag("compare the output with the source (jaxreshard verify) before committing it")
    transform: str | None = option("transform rules YAML: rename, transpose, stack or concat tensors while "
                                   "converting (configs/transforms/)", default=None, metavar="T.yaml")
    reverse: bool = flag("run --transform backwards (unstack, split, transpose back)")
    quiet: bool = common.quiet()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConvertOptions(PlanOptions):
    dst: str = common.dst()
    resume: bool = flag("after a crash: keep the rank files the interrupted run of this same conversion completed "
                        "(sizes and SHA-256 checked again) and write only the rest")


def _planning(opts: PlanOptions) -> dict[str, Any]:
    """The keywords planning takes (what `plan` shows is what `convert` writes)."""
    names = ("src_layout", "dst_layout", "src_strategy", "dst_strategy", "prefix", "dtype", "output_format",
             "exact_replicas", "verify_crc", "transform", "reverse", "dequantize")
    return {name: getattr(opts, name) for name in names}


@gc_paused()  # reading 300 headers and planning 90k tensors makes a million objects and no cycles
@remote.option_views(sources=("src",))
def run_plan(opts: PlanOptions) -> int:
    for line in describe.describe_plan(api.plan_conversion(opts.src, ranks=opts.ranks, **_planning(opts)).plan):
        print(remote.display(line))
    return 0


def run_convert(opts: ConvertOptions) -> int:
    report = api.convert(
        opts.src, opts.dst, hf=opts.hf, max_file_size=opts.max_file_size, overwrite=opts.overwrite,
        progress=not opts.quiet, ranks=opts.ranks, process_num=opts.workers,
        coordinator_address=opts.coordinator_address, num_processes=opts.num_processes, process_id=opts.process_id,
        verify=opts.verify, resume=opts.resume, **_planning(opts),
    )  # fmt: skip
    rate = report.stats.write_bytes / max(report.seconds, 1e-9)
    print(
        f"wrote {len(report.files)} file(s), {describe.human_bytes(report.stats.write_bytes)} to {report.dst} "
        f"in {report.seconds:.2f} s ({describe.human_bytes(rate)}/s)"
    )
    return 0


CONVERT = Command("convert", ConvertOptions, run_convert,
                  "convert a checkpoint into another layout (split, reshard or merge)")
PLAN = Command("plan", PlanOptions, run_plan, "print what convert would read and write, per rank; writes nothing")
