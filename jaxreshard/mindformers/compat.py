"""MindFormers' offline conversion semantics, for the drop-in scripts under `tools/`.

`transform_checkpoint.py` takes a complete `.ckpt` file, a folder of complete `.ckpt` files (each converted on
its own), or a folder of `rank_<n>/`, and writes `<dst>/<stem>/rank_<r>/<prefix><r>.ckpt` (stem: the file name
up to its first dot, or the folder's name). Its multi-process mode gives converting rank `i * world/n` the
destination ranks `[i * world/n, (i + 1) * world/n)`. We keep those results and drop the bugs: booleans parse
as booleans, nothing is deleted or written into input folders, the file picked in a rank folder is logged,
and every failure is an exit code.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import api, remote
from ..errors import ConfigError, JaxreshardError
from ..formats.mindspore_strategy import read_strategy
from ..logs import configure_logging
from ..merge import merge_lora, plan_unify, write_unified
from ..values import parse_bool as parse_bool  # the shims' spelling of flags; re-exported for auto

log = logging.getLogger(__name__)


def strategy_arg(value: str | None) -> str | None:
    """MindFormers spells 'no strategy' as an empty value or the string 'None'."""
    return None if value in (None, "", "None", "none") else value


def legacy_jobs(src_checkpoint: Path, dst_dir: Path) -> list[tuple[Path, Path]]:
    """(source, destination) per conversion job, named like MindFormers' `<dst>/<stem>/`."""
    src = Path(src_checkpoint)
    if not src.exists():
        raise ConfigError(f"{src}: --src_checkpoint does not exist")
    if src.is_file():
        if src.suffix != ".ckpt":
            raise ConfigError(f"{src}: --src_checkpoint must be a .ckpt file or a folder")
        return [(src, dst_dir / src.name.split(".")[0])]
    if (src / "rank_0").is_dir():
        return [(src, dst_dir / src.name)]
    files = sorted(p for p in src.glob("*.ckpt") if p.is_file())
    if not files:
        raise ConfigError(f"{src}: no rank_0/ folder and no .ckpt files")
    stems: dict[str, Path] = {}
    for path in files:
        stem = path.name.split(".")[0]
        if stem in stems:  # MindFormers silently converts only one of them
            raise ConfigError(f"{src}: {stems[stem].name} and {path.name} would both be written to {stem}/; rename one")
        stems[stem] = path
    return [(path, dst_dir / stem) for stem, path in stems.items()]


def rank_block(rank_id: int | None, world_size: int, process_num: int) -> str | None:
    """The destination ranks converting rank `rank_id` writes ('a-b'), or None if it converts none."""
    if process_num < 1 or world_size % process_num:
        raise ConfigError(f"--transform_process_num {process_num} must divide --world_size {world_size}")
    size = world_size // process_num
    if rank_id is None or rank_id % size:
        return None
    return f"{rank_id}-{rank_id + size - 1}"


@remote.views(sources=("src_checkpoint",))  # s3:// and gs:// sources (destinations: write locally)
def transform_checkpoint(
    src_checkpoint: str, dst_dir: str, src_strategy: str | None, dst_strategy: str | None, prefix: str,
    rank_id: int | None, world_size: int | None, process_num: int, overwrite: bool = False,
) -> int:  # fmt: skip
    """`transform_checkpoint.py`: returns the exit code."""

    def body() -> None:
        nonlocal dst_dir, rank_id
        if not dst_dir:
            dst_dir = str(Path.cwd() / "transformed_checkpoint")
            log.warning("--dst_checkpoint_dir not given; writing to %s", dst_dir)
        if rank_id is None and os.environ.get("RANK_ID", "").isdigit() and process_num > 1:
            rank_id = int(os.environ["RANK_ID"])
        for src, dst in legacy_jobs(Path(src_checkpoint), Path(dst_dir)):
            job = api.plan_conversion(src, src_strategy=strategy_arg(src_strategy),
                                      dst_strategy=strategy_arg(dst_strategy), prefix=prefix)
            total = len(job.plan.ranks)
            if world_size not in (None, 1, total):
                raise ConfigError(f"--world_size {world_size} differs from the destination strategy's {total} ranks")
            ranks = rank_block(rank_id, total, process_num) if rank_id is not None and process_num > 1 else None
            if rank_id is not None and process_num > 1 and ranks is None:
                log.info("rank %d converts nothing: converting ranks are multiples of %d", rank_id,
                         total // process_num)
                continue
            report = api.convert(
                src, dst, src_strategy=strategy_arg(src_strategy), dst_strategy=strategy_arg(dst_strategy),
                prefix=prefix, ranks=ranks, process_num=process_num if ranks is None else 1,
                overwrite=overwrite,
            )  # fmt: skip
            log.info("wrote %d file(s) under %s", len(report.files), dst)

    return _run("transform_checkpoint", body)


def _run(tool: str, body: Callable[[], None]) -> int:
    """Run a drop-in's body with the CLI's logging; a JaxreshardError is one `<tool>: error: ...` line, exit 2."""
    configure_logging()
    try:
        body()
    except JaxreshardError as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 2
    return 0


def transform_ckpt_lora(src: str, src_strategy: str | None, dst_dir: str, prefix: str, lora_scaling: float | None,
                        save_format: str, overwrite: bool = False) -> int:
    """`transform_ckpt_lora.py`: one complete `dst_dir/merged_lora.<format>` with every LoRA branch folded in.
    Unlike MindFormers: no silent scale of 1 (the scale is required), the destination folder is created, a
    transposed base works, optimizer states are dropped, and a distributed source is merged in full."""
    def body() -> None:
        if lora_scaling is None:
            raise ConfigError("--lora_scaling is required (MindFormers silently used 1): lora_alpha / r")
        out = Path(dst_dir) / f"merged_lora.{save_format}"
        if out.exists() and not overwrite:
            raise ConfigError(f"{out} exists; pass --overwrite to replace it")
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".merged_lora.", dir=dst_dir))
        try:
            merge_lora(src, work / "out", src_strategy=strategy_arg(src_strategy), lora_scaling=lora_scaling,
                       prefix=prefix, output_format=save_format)
            os.replace(work / "out" / "rank_0" / f"{prefix}0.{save_format}", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.info("wrote %s", out)

    return _run("transform_ckpt_lora", body)


def unified_safetensors(src_strategy_dirs: str | None, ckpt_dir: str, output_dir: str, file_suffix: str | None,
                        has_redundancy: bool | None, filter_out_param_prefix: list[str], max_process_num: int,
                        overwrite: bool = False) -> int:
    """`unified_safetensors.py`: MindSpore's unified layout under `<output_dir>/<suffix>_ckpt_convert/unified_safe/`
    (`part{i}.safetensors`, `param_name_map.json`, `hyper_param.safetensors` for parameters outside the strategy)
    so MindFormers' loaders accept it. Unlike MindFormers: nothing is deleted first, filtered parameters appear
    nowhere, the strategy folder is merged in memory, and a failed worker fails the command."""
    def body() -> None:
        strategy = strategy_arg(src_strategy_dirs)
        prefixes = [*filter_out_param_prefix, "accu_grads"]
        job = plan_unify(ckpt_dir, src_strategy=strategy, file_suffix=file_suffix, has_redundancy=has_redundancy,
                         filter_out_param_prefix=prefixes)
        known = set(read_strategy(Path(strategy)).params) if strategy else set()
        hyper = [p for p in job.plan.params if strategy and p not in known]
        dst = Path(output_dir) / f"{file_suffix}_ckpt_convert" / "unified_safe"  # MindFormers: "None_..." too
        files = write_unified(job, dst, layout="ms", process_num=max(1, max_process_num), overwrite=overwrite,
                              hyper=hyper)
        log.info("wrote %d file(s) to %s", len(files), dst)

    return _run("unified_safetensors", body)
