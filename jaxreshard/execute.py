"""Execution: follow a plan one parameter at a time, writing every destination rank file.

Each parameter is dispatched once on the type of its source (`WRITE`): box reads become one sharded array
on the destination mesh (arrays.py: `make_array_from_callback` over aligned buffers JAX aliases, read once per
box so data-parallel replicas share one read), whose addressable shards go to the writer of every rank that
holds them; per-rank copies are written box by box without JAX; restored arrays come from their reader.
Only one parameter's boxes are in memory at a time.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import apply_transforms, build_array, from_jax
from .box import Box
from .composed import Composed
from .devices import cpu_devices, ensure_cpu_devices, make_mesh
from .errors import FormatError
from .fill import fill_boxes, prefetch
from .formats.base import FileHandles, RankWriter, aligned_empty
from .formats.manifest import FileRecord
from .fsutil import fault, write_failure
from .plan import BoxReads, PerRankCopy, Plan, RankPlan, Restore, ShardPlan
from .transforms import cast_box

__all__ = ["WriterFactory", "execute"]

PROGRESS_BYTES = 512 << 20  # with on_progress: fsync and journal the open files' state this often (--resume)
SYNC_THREADS = 8  # files fsynced at once for a progress report
GC_BYTES = 4 << 20  # collect the young generation after parameters this big (1 ms), so buffers never pile up

WriterFactory = Callable[[Path, list[tuple[str, np.dtype, tuple[int, ...]]], RankPlan], RankWriter]
OnProgress = Callable[[int, dict[str, tuple[int, str]]], None]


def execute(
    plan: Plan,
    dst_dir: Path,
    make_writer: WriterFactory,
    *,
    on_bytes: Callable[..., None] = lambda n, param=None: None,
    on_file: Callable[[str, FileRecord], None] = lambda rel, record: None,
    on_progress: OnProgress | None = None,
    skip: int = 0,
) -> dict[str, FileRecord]:
    """Write every rank file of `plan` under `dst_dir` (which the caller has made and will commit); returns the
    size and SHA-256 of every file written, by POSIX path relative to `dst_dir`.

    `on_bytes(n)` is called with the bytes of each rank write, and `on_bytes(0, param)` when a parameter is done.
    Each rank's writer is closed (fsynced) as soon as its last parameter is written, and `on_file(rel, record)`
    is told of each file then (so `--resume` can keep the ranks a killed run completed, e.g. earlier pipeline
    stages). With `on_progress`, every `PROGRESS_BYTES` written the open files are fsynced and
    `on_progress(k, {rel: (bytes, sha256 of them)})` says the first k parameters (in plan order) are in them;
    `skip=k` continues such files (the writers were made to continue them) from parameter k.
    """
    ensure_cpu_devices(max((i.dst_layout.devices_per_stage for i in plan.params.values()), default=1))
    run = _Run(plan, dst_dir, on_bytes, on_file, on_progress)
    try:
        run.open_writers(make_writer)
        with FileHandles() as handles:
            order = [p for p in run.order if run.position[p] >= skip]  # the rest are in the continued files
            for i, param in enumerate(order):
                if i + 1 < len(order):
                    prefetch(plan, list(run.users[order[i + 1]]), handles)
                try:
                    WRITE[type(plan.params[param].source)](run, param, handles)
                except OSError as e:
                    raise FormatError(f"parameter {param!r}: reading the source failed: {e}") from e
                run.param_done(param)
        for rank in list(run.writers):  # ranks with text entries only
            run.close(rank)
    except BaseException:
        for writer in run.writers.values():  # release file descriptors; the caller removes the partial output
            writer.abort()
        raise
    return run.done


class _Run:
    """The state of one `execute`: open writers, which ranks take each shard, what is done."""

    def __init__(self, plan: Plan, dst_dir: Path, on_bytes, on_file, on_progress: OnProgress | None):
        self.plan, self.dst_dir = plan, dst_dir
        self.on_bytes, self.on_file, self.on_progress = on_bytes, on_file, on_progress
        self.devices = cpu_devices()
        self.writers: dict[int, RankWriter] = {}
        self.files = {rank.dst_rank: rank.dst_file for rank in plan.ranks}
        self.users: dict[str, dict[ShardPlan, list[int]]] = {p: {} for p in plan.params}
        sharing: dict[int, tuple[tuple[ShardPlan, ...], list[int]]] = {}  # replicas share one shards tuple:
        for rank in plan.ranks:  # each tuple is walked once, not once per rank (90k shards x 1024 ranks)
            sharing.setdefault(id(rank.shards), (rank.shards, []))[1].append(rank.dst_rank)
        for shards, ranks in sharing.values():
            for shard in shards:
                self.users[shard.param].setdefault(shard, []).extend(ranks)
        if len(sharing) > 1:
            place = {rank.dst_rank: i for i, rank in enumerate(plan.ranks)}
            for users in self.users.values():
                for holders in users.values():
                    holders.sort(key=place.__getitem__)  # in the plan's rank order, as listed rank by rank
        self.position = {p: i for i, p in enumerate(plan.params)}
        self.order = [p for p in plan.params if self.users[p]]
        self.last_of: dict[str, list[int]] = {}  # parameter -> ranks whose file is complete once it is written
        lasts: dict[int, str | None] = {}  # per shared shards tuple
        for rank in plan.ranks:
            if id(rank.shards) not in lasts:
                mine = {s.param for s in rank.shards}
                lasts[id(rank.shards)] = next((p for p in reversed(self.order) if p in mine), None)
            last = lasts[id(rank.shards)]
            if last is not None:
                self.last_of.setdefault(last, []).append(rank.dst_rank)
        self.meshes: dict[tuple[tuple[str, int], ...], Any] = {}
        self.done: dict[str, FileRecord] = {}
        self.unsynced = 0

    def open_writers(self, make_writer: WriterFactory) -> None:
        for rank in self.plan.ranks:
            entries = [(s.param, self.plan.params[s.param].dst_dtype, s.dst_box.shape) for s in rank.shards]
            with _writing(rank.dst_file):
                self.writers[rank.dst_rank] = make_writer(self.dst_dir / rank.dst_file, entries, rank)

    def emit(self, param: str, data: np.ndarray, ranks: list[int]) -> None:
        for rank in ranks:
            with _writing(self.files[rank]):
                self.writers[rank].write(param, data)
            self.on_bytes(data.nbytes)

    def mesh(self, param: str) -> Any:
        layout = self.plan.params[param].dst_layout
        if layout.mesh_axes not in self.meshes:
            self.meshes[layout.mesh_axes] = make_mesh(layout, self.devices)
        return self.meshes[layout.mesh_axes]

    def param_done(self, param: str) -> None:
        """After a parameter: closes the files it completes, reports progress, frees its buffers."""
        self.on_bytes(0, param)
        fault("param-written")
        for rank in self.last_of.get(param, ()):
            self.close(rank)
        self.progress(param)
        info = self.plan.params[param]
        if info.src_dtype.itemsize * math.prod(info.shape) >= GC_BYTES:
            gc.collect(1)  # make_array_from_callback leaves a reference cycle holding our buffers

    def progress(self, param: str) -> None:
        """fsync the open files and report how far they are written, every PROGRESS_BYTES."""
        info = self.plan.params[param]
        self.unsynced += sum(s.dst_box.size * len(r) for s, r in self.users[param].items()) * info.dst_dtype.itemsize
        if self.on_progress is None or self.unsynced < PROGRESS_BYTES or not self.writers:
            return
        self.unsynced = 0
        if not all(hasattr(writer, "sync") for writer in self.writers.values()):  # optional (safetensors has it)
            return
        syncs = {rank: writer.sync for rank, writer in self.writers.items()}  # pyright: ignore[reportAttributeAccessIssue]
        # the files' fsyncs overlap (each writer on one thread of its own pool: the write pool drains them)
        with ThreadPoolExecutor(min(SYNC_THREADS, len(syncs)), thread_name_prefix="jaxreshard-sync") as pool:
            pending = {rank: pool.submit(sync) for rank, sync in syncs.items()}
        states: dict[str, tuple[int, str]] = {}
        for rank, future in pending.items():
            with _writing(self.files[rank]):  # a write behind may fail here: it names its file
                state = future.result()
            if state is None:
                return  # written out of file order: nothing a rerun could continue
            states.update({Path(p).relative_to(self.dst_dir).as_posix(): v for p, v in state.items()})
        self.on_progress(self.position[param] + 1, states)

    def close(self, rank: int) -> None:
        writer = self.writers.pop(rank)
        try:
            with _writing(self.files[rank]):
                records = writer.close() or {}
        except BaseException:
            writer.abort()
            raise
        fault("file-closed")
        for path, record in records.items():
            rel = Path(path).relative_to(self.dst_dir).as_posix()
            self.done[rel] = record
            self.on_file(rel, record)


def _write_per_rank(run: _Run, param: str, handles: FileHandles) -> None:
    """Per-rank copies: each box read, transformed and written on its own, without one sharded array."""
    info = run.plan.params[param]
    for shard, ranks in run.users[param].items():
        buf = aligned_empty(shard.dst_box.shape, info.src_dtype)
        fill_boxes(run.plan, [(shard, buf)], handles)
        (out,) = apply_transforms(param, info, {shard.dst_box: buf}, handles).values()
        run.emit(param, out, ranks)


def _write_box_reads(run: _Run, param: str, handles: FileHandles) -> None:
    """One sharded array on the destination mesh; each rank gets the shard of its own device. Replicas read
    from different source ranks on purpose (`exact_replicas`) are not one array: written per rank."""
    shards = run.users[param]
    if len({s.dst_box for s in shards}) < len(shards):
        _write_per_rank(run, param, handles)
        return
    by_box = {s.dst_box: s for s in shards}
    _write_array(run, param, by_box, lambda sharding: build_array(run.plan, param, by_box, sharding, handles))


def _write_restored(run: _Run, param: str, handles: FileHandles) -> None:
    """An array its reader restores straight into the destination sharding (source dtype; cast per shard)."""
    by_box = {s.dst_box: s for s in run.users[param]}
    _write_array(run, param, by_box, lambda sharding: build_array(run.plan, param, by_box, sharding, handles))


def _write_array(run: _Run, param: str, by_box: dict[Box, ShardPlan], make: Callable[[Any], Any]) -> None:
    from jax.sharding import NamedSharding

    info = run.plan.params[param]
    mesh = run.mesh(param)
    array = make(NamedSharding(mesh, info.dst_layout.partition_spec()))
    n = info.dst_layout.devices_per_stage
    local_of = {d.id: i for i, d in enumerate(mesh.devices.flat)}
    restored = isinstance(info.source, Restore)
    for piece in array.addressable_shards:  # each rank gets the shard of its own device
        shard = by_box.get(Box.from_index(piece.index[: len(info.shape)], info.shape))
        if shard is not None:
            ranks = [r for r in run.users[param][shard] if r % n == local_of[piece.device.id]]
            data = np.asarray(piece.data)
            data = cast_box(data, info.dst_dtype) if restored and data.dtype != info.dst_dtype else \
                from_jax(data, info.dst_dtype)  # fmt: skip
            run.emit(param, data, ranks)
    array.delete()  # release the device buffers (our aliased host memory) now, not at some later collection


WRITE: dict[type, Callable[[_Run, str, FileHandles], None]] = {
    BoxReads: _write_box_reads, PerRankCopy: _write_per_rank, Restore: _write_restored,
    Composed: _write_box_reads,  # a box of a composed parameter is read piece by piece (fill.py)
}


@contextlib.contextmanager
def _writing(file: str) -> Iterator[None]:
    """An OSError while writing `file` (a path under the destination) is the destination's fault (full,
    read-only, quota), not the source's: say so, naming the file."""
    try:
        yield
    except OSError as e:
        raise write_failure(e, file) from None
