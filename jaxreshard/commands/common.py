"""Options that several commands share, each spelled and explained once (a command declares it as a field:
`src_layout: str | None = common.src_layout()`)."""

from __future__ import annotations

from typing import Any

from .options import WORKER_COUNT, flag, option, parse_bytes


def src(help: str = "source checkpoint: a file, a Hugging Face directory, or a folder of rank_<n>/", **kw: Any) -> Any:
    return option(help, **kw)


def dst(help: str = "destination directory (written as DST/rank_<r>/<prefix><r>.safetensors)", **kw: Any) -> Any:
    return option(help, **kw)


def src_layout() -> Any:
    return option("native layout YAML the source was saved with (none = complete source)", default=None)


def src_strategy() -> Any:
    return option("MindSpore strategy file or directory the source was saved with", default=None)


def dst_layout() -> Any:
    return option("native layout YAML to produce (none = one complete checkpoint)", default=None)


def dst_strategy() -> Any:
    return option("MindSpore strategy file or directory to produce", default=None)


def output_format() -> Any:
    return option("ckpt or safetensors (default: the source's format)", default=None)


def prefix() -> Any:
    return option("output file name prefix: rank_<r>/<prefix><r>.safetensors", default="checkpoint_")


def hf() -> Any:
    return flag("write a complete destination as Hugging Face model-0000i-of-0000n.safetensors + index")


def max_file_size(help: str = "with --hf: largest part file, e.g. 5GB or 500MiB", default: int | None = None) -> Any:
    return option(help, parse_bytes, default, metavar="SIZE")


def workers() -> Any:
    """Local worker processes; `--process-num` / `process_num:` (MindFormers' name, older scripts) stay accepted.
    Not `num_processes`, which counts the processes of a multi-host jax.distributed job."""
    return option("convert with N local worker processes, each a contiguous block of ranks (N divides them)",
                  WORKER_COUNT, 1, aliases=("process_num",), metavar="N")


def overwrite() -> Any:
    return flag("replace an existing non-empty destination (only after the new one is complete)")


def quiet() -> Any:
    return flag("no progress bar", short="-q")
