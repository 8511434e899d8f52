"""Running a plan into a destination directory: atomically, in one or several processes, whole or in part.

- The whole destination: written into a temporary sibling and renamed into place when complete.
- Some ranks only (`--ranks`, e.g. one node's share): each rank folder is committed on its own, so several
  invocations (nodes, or MindFormers-style launchers) can fill one destination; other rank folders are never
  touched.
- `process_num` > 1: the destination ranks are cut into that many contiguous blocks (8 ranks, 2 processes:
  0-3 and 4-7, as MindFormers does), each converted by its own process with its own bounded memory; any
  failure fails the whole run and nothing is committed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from .caps import MAX_RANKS
from .errors import ConfigError, OutputExistsError
from .execute import execute
from .formats.writers import writer_factory
from .fsutil import atomic_output, fsync_tree, partial_dir
from .plan import Plan


@dataclass(frozen=True)
class Output:
    """How rank files are written (see `formats.writers.writer_factory`)."""

    output_format: str
    hf: bool = False
    max_file_bytes: int | None = None
    mindspore: bool = False


def parse_ranks(text: str | None) -> list[int] | None:
    """'0-3,8' -> [0, 1, 2, 3, 8]; ASCII digits only, every rank below `MAX_RANKS`, checked before any range is
    expanded (so '0-300000000' is refused at once instead of building a list of 300 million ranks)."""
    if text is None or text == "":
        return None
    spans: list[tuple[int, int]] = []
    for part in str(text).split(","):
        bounds = [b.strip() for b in part.split("-")] if part.count("-") <= 1 else []
        if not bounds or not all(b.isascii() and b.isdigit() for b in bounds):
            raise ConfigError(f"--ranks {str(text)[:80]!r} is not a rank list; write e.g. 0-3,8 (ranges ascending)")
        for digits in bounds:
            if len(digits) > 9 or int(digits) >= MAX_RANKS:
                raise ConfigError(f"--ranks {str(text)[:80]!r}: rank {digits[:20]} is beyond the cap of {MAX_RANKS} "
                                  f"ranks (0-{MAX_RANKS - 1}); give the destination's ranks")
        first, last = int(bounds[0]), int(bounds[-1])
        if first > last:
            raise ConfigError(f"--ranks {str(text)[:80]!r} is not a rank list; write e.g. 0-3,8 (ranges ascending)")
        spans.append((first, last))
    return sorted({r for first, last in spans for r in range(first, last + 1)})


def run_plan(
    plan: Plan, dst: Path, output: Output, *, overwrite: bool, some_ranks: bool, process_num: int = 1,
    on_bytes=lambda n, param=None: None, before_commit: Callable[[Path], None] | None = None,
) -> None:  # fmt: skip
    """Write every rank of `plan` under `dst` (see the module docstring). `before_commit(tmp)` runs once every
    file is complete in the temporary folder; if it raises, nothing is committed."""
    if process_num < 1 or len(plan.ranks) % process_num:
        raise ConfigError(
            f"--process-num {process_num} must divide the {len(plan.ranks)} destination ranks being written "
            "(each process converts one contiguous block)"
        )
    if not some_ranks:
        with atomic_output(dst, overwrite=overwrite) as tmp:
            _execute(plan, tmp, output, process_num, on_bytes)
            if before_commit is not None:
                before_commit(tmp)
        return
    dst = Path(dst).absolute()
    folders = sorted({r.dst_file.split("/")[0] for r in plan.ranks})
    taken = [f for f in folders if (dst / f).exists()]
    if taken and not overwrite:
        raise OutputExistsError(f"{dst}: {', '.join(taken)} already exist; pass --overwrite to replace them")
    tmp = partial_dir(dst)
    try:
        _execute(plan, tmp, output, process_num, on_bytes)
        if before_commit is not None:
            before_commit(tmp)
        fsync_tree(tmp)
        dst.mkdir(parents=True, exist_ok=True)
        for folder in folders:  # each rank folder replaces its old self only once complete
            if (dst / folder).exists():
                shutil.rmtree(dst / folder)
            os.rename(tmp / folder, dst / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _execute(plan: Plan, tmp: Path, output: Output, process_num: int, on_bytes) -> None:
    if process_num == 1:
        execute(plan, tmp, _factory(output, tmp), on_bytes=on_bytes)
        return
    size = len(plan.ranks) // process_num
    blocks = [replace(plan, ranks=plan.ranks[i : i + size]) for i in range(0, len(plan.ranks), size)]
    with ProcessPoolExecutor(process_num, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_execute_block, block, tmp, output) for block in blocks]
        for future, block in zip(futures, blocks):
            future.result()  # re-raises a worker's error: the run fails and nothing is committed
            on_bytes(sum(s.dst_box.size * block.params[s.param].dst_dtype.itemsize
                         for r in block.ranks for s in r.shards))


def _execute_block(plan: Plan, tmp: Path, output: Output) -> None:
    execute(plan, tmp, _factory(output, tmp))


def _factory(output: Output, tmp: Path):
    return writer_factory(output.output_format, tmp, hf=output.hf, max_file_bytes=output.max_file_bytes,
                          mindspore=output.mindspore)
