"""`jaxreshard unify`: merge distributed safetensors into complete Hugging Face-style part files + index."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import merge, remote
from . import common
from .options import Command, option, parse_truth

DEFAULT_PART_BYTES = 5 * 10**9  # Hugging Face's usual largest part file (5GB)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnifyOptions:
    src: str = common.src()
    dst: str = common.dst("destination directory (complete part files + model.safetensors.index.json)")
    src_layout: str | None = common.src_layout()
    src_strategy: str | None = common.src_strategy()
    max_file_size: int = common.max_file_size("largest part file, e.g. 5GB (the default) or 500MiB",
                                              DEFAULT_PART_BYTES)
    workers: int = common.workers()
    overwrite: bool = common.overwrite()
    quiet: bool = common.quiet()
    file_suffix: str | None = option("in each rank folder take the one *<suffix>.safetensors", default=None)
    has_redundancy: bool | None = option("true if every rank still holds its replicas (checked against the "
                                         "files' remove_redundancy metadata)", parse_truth, None, metavar="BOOL")
    filter_out_param_prefix: tuple[str, ...] = option("drop parameters whose names start with these", default=(),
                                                      many=True)


@remote.option_views(sources=("src",), destination="dst")
def run_unify(opts: UnifyOptions) -> int:
    job = merge.plan_unify(opts.src, src_layout=opts.src_layout, src_strategy=opts.src_strategy,
                           file_suffix=opts.file_suffix, has_redundancy=opts.has_redundancy,
                           filter_out_param_prefix=opts.filter_out_param_prefix)
    files = merge.write_unified(job, Path(opts.dst), max_file_bytes=opts.max_file_size, process_num=opts.workers,
                                overwrite=opts.overwrite)
    print(remote.display(f"wrote {len(files)} file(s) to {opts.dst}"))
    return 0


COMMAND = Command("unify", UnifyOptions, run_unify,
                  "merge distributed safetensors into complete Hugging Face-style part files + index")
