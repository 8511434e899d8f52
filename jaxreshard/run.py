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

import contextlib
import ctypes
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path

from . import manifests, remote, resume
from .arrays import build_arrays
from .devices import cpu_devices, ensure_cpu_devices
from .errors import ConfigError, FormatError, OutputError
from .execute import execute
from .formats.companions import copy_companions, place_companions
from .formats.manifest import FileRecord, Manifest, write_manifest
from .formats.orbax_io import OrbaxWriter, x64
from .formats.writers import OutputKind, writer_factory
from .fsops import make_dir
from .fsutil import atomic_output, staged_rank_folders
from .plan import PerRankCopy, Plan, RankPlan
from .values import parse_ranks as parse_ranks  # its old home (the API and the options import it here)

PR_SET_PDEATHSIG = 1
Describe = Callable[[dict[str, FileRecord]], Manifest]  # the output's manifest, given its files


@dataclass(frozen=True)
class Output:
    """How rank files are written (see `formats.writers.writer_factory`)."""

    kind: OutputKind
    hf: bool = False
    max_file_bytes: int | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # the source's safetensors metadata, carried into every file
    num_ranks: int = 1  # ranks of the destination layout (> 1: rank files record their block, see manifests)
    companions: tuple[Path, ...] = ()  # the source folder's non-weight files, copied to the output root


def run_plan(
    plan: Plan, dst: Path, output: Output, *, overwrite: bool, some_ranks: bool, process_num: int = 1,
    on_bytes=lambda n, param=None: None, describe: Describe | None = None,
    before_commit: Callable[[Path], None] | None = None, resume_run: bool = False,
) -> dict[str, FileRecord]:  # fmt: skip
    """Write every rank of `plan` under `dst` (see the module docstring); returns each file's size and SHA-256
    by path relative to `dst`.

    `describe` builds the manifest: written into the temporary folder once every file is complete (a whole
    destination), or merged into `dst`'s root manifest after the rank folders are committed (`some_ranks`).
    `before_commit(tmp)` runs after that, before anything is committed (e.g. verifying the output).
    `resume_run` first adopts the verified files of an interrupted run of the same conversion (see resume.py).
    """
    if process_num < 1 or len(plan.ranks) % process_num:
        raise ConfigError(
            f"--process-num {process_num} must divide the {len(plan.ranks)} destination ranks being written "
            "(each process converts one contiguous block)"
        )
    key = resume.plan_key(plan, output)
    continuable = process_num == 1 and output.kind == OutputKind("safetensors") and not output.hf
    # (native safetensors written in file order by one process: files can be continued)
    held = resume.adopt(dst, key, plan, continuable=continuable) if resume_run else None
    fill = partial(_fill, plan, output=output, process_num=process_num, on_bytes=on_bytes, key=key, held=held,
                   continuable=continuable, before_commit=before_commit)
    if not some_ranks:
        with atomic_output(dst, overwrite=overwrite) as tmp:
            files = fill(tmp, describe)
        return files
    dst = Path(dst).absolute()
    if describe is not None:
        manifests.check_root_layout(dst, describe({}))
    folders = sorted({r.dst_file.split("/")[0] for r in plan.ranks})
    with staged_rank_folders(dst, folders, [r.dst_rank for r in plan.ranks], overwrite=overwrite) as tmp:
        files = fill(tmp, None)
        placed = {}
        if describe is not None and output.companions:  # before the rank folders commit: a conflict stops both
            make_dir(dst)
            placed = place_companions(output.companions, dst)
    if describe is not None:
        manifests.merge_root_manifest(dst, describe({**files, **placed}), folders)
    return files


def _fill(plan: Plan, tmp: Path, describe: Describe | None, *, output: Output, process_num: int, on_bytes,
          key: str, held: resume.Held | None, continuable: bool,
          before_commit: Callable[[Path], None] | None) -> dict[str, FileRecord]:
    """Everything that goes into the temporary folder before a commit: the rank files (journaled for
    `--resume`), then the manifest (if `describe`), then `before_commit(tmp)`."""
    files = _execute(plan, tmp, output, process_num, on_bytes, key, held, continuable)
    resume.finish(tmp)
    if describe is not None:  # a whole output (not one --ranks share): the source's companion files, then
        files.update(copy_companions(output.companions, tmp))  # the manifest listing everything
        write_manifest(tmp, describe(files))
    if before_commit is not None:
        before_commit(tmp)
    return files


def _execute(plan: Plan, tmp: Path, output: Output, process_num: int, on_bytes, key: str,
             held: resume.Held | None, continuable: bool) -> dict[str, FileRecord]:
    files = resume.start(tmp, key, held)  # the files kept from an interrupted run, moved into tmp
    plan = replace(plan, ranks=tuple(r for r in plan.ranks if r.dst_file not in files))
    if not plan.ranks:
        return files
    if process_num == 1:
        resumed = {tmp / rel: prefix for rel, prefix in held.partial.items()} if held else {}
        files.update(execute(plan, tmp, _factory(output, tmp, plan, resumed), on_bytes=on_bytes,
                             on_file=resume.journal_writer(tmp), skip=held.skip if held and resumed else 0,
                             on_progress=resume.progress_writer(tmp) if continuable else None))
        return files
    size = math.ceil(len(plan.ranks) / process_num)  # after a resume the rest need not divide evenly
    blocks = [replace(plan, ranks=plan.ranks[i : i + size]) for i in range(0, len(plan.ranks), size)]
    with worker_pool(len(blocks)) as pool:
        futures = [pool.submit(_execute_block, block, tmp, output) for block in blocks]
        for future, block in zip(futures, blocks):
            try:
                files.update(future.result())  # re-raises a worker's error: the run fails, nothing is committed
            except BrokenProcessPool:
                lost = [_rank_span(b) for f, b in zip(futures, blocks) if not f.done() or f.exception()]
                raise OutputError(
                    f"a --process-num worker died (killed, or out of memory?) while converting destination ranks "
                    f"{' or '.join(lost)}; nothing was committed"
                ) from None
            on_bytes(sum(s.dst_box.size * block.params[s.param].dst_dtype.itemsize
                         for r in block.ranks for s in r.shards))
    return files


def run_orbax(plan: Plan, dst: Path, *, overwrite: bool) -> None:
    """The complete parameters of `plan` as one orbax checkpoint at `dst`, each array carrying its destination
    sharding; committed through `atomic_output` like every output (the old output stays until the rename)."""
    if any(isinstance(info.source, PerRankCopy) for info in plan.params.values()):
        raise FormatError("orbax output holds complete parameters; MindSpore pass-through copies cannot be written")
    ensure_cpu_devices(max((i.dst_layout.devices_per_stage for i in plan.params.values()), default=1))
    with atomic_output(Path(dst).absolute(), overwrite=overwrite) as tmp:  # orbax refuses relative paths
        writer = OrbaxWriter(tmp, list(plan.params))
        try:
            with x64(any(i.dst_dtype.itemsize == 8 for i in plan.params.values())):  # 64-bit stays 64-bit
                build_arrays(plan, writer.write, cpu_devices())
                writer.close()
        except BaseException:
            writer.abort()
            raise


def _rank_span(plan: Plan) -> str:
    first, last = plan.ranks[0].dst_rank, plan.ranks[-1].dst_rank
    return f"{first}-{last}" if first != last else str(first)


@contextlib.contextmanager
def worker_pool(n: int) -> Iterator[ProcessPoolExecutor]:
    """`n` spawned worker processes that die with this one (PR_SET_PDEATHSIG), ignore Ctrl-C (the parent
    handles it), and are killed at once if the parent's work fails or is interrupted, so no worker goes on
    writing for nobody."""
    pool = ProcessPoolExecutor(n, mp_context=get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(), remote.source_mounts()))  # fmt: skip
    try:
        yield pool
    except BaseException:
        _kill_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    # Every result is in. A worker killed while idle (OOM killer, an operator) can die holding the task
    # queue's lock; the pool's own shutdown hands each worker its stop message through that queue and would
    # then wait forever (so would Python's exit). The workers have nothing left to do: stop them first.
    _kill_workers(pool)
    pool.shutdown(wait=True)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    for pid in list(getattr(pool, "_processes", None) or {}):  # private, but stable since 3.2
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _worker_init(parent: int, mounts: dict) -> None:
    remote.adopt_source_mounts(mounts)  # an object-store source's views: else its holes read as zeros
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _execute_block(plan: Plan, tmp: Path, output: Output) -> dict[str, FileRecord]:
    return execute(plan, tmp, _factory(output, tmp, plan), on_file=resume.journal_writer(tmp))


def _factory(output: Output, tmp: Path, plan: Plan, resumed: dict | None = None):
    def rank_metadata(rank: RankPlan) -> dict[str, str]:
        return manifests.rank_metadata(plan, rank, output.num_ranks)

    describe = rank_metadata if output.num_ranks > 1 else None
    return writer_factory(output.kind, tmp, hf=output.hf, max_file_bytes=output.max_file_bytes,
                          metadata=dict(output.metadata), describe=describe,
                          resumed=resumed)
