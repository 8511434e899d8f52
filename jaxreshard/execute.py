"""Execution: follow a plan one parameter at a time, through `jax.make_array_from_callback`.

For each parameter the destination array is built on the destination mesh; the callback reads only the
source regions its device's box needs, into a 64-byte-aligned buffer that JAX aliases instead of copying,
and caches it by box so data-parallel replicas share one read and one buffer. Each addressable shard is then
handed to the writer of every rank that holds it. Only one parameter's boxes are in memory at a time.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .box import Box
from .errors import FormatError, LayoutError
from .fill import fill_boxes, prefetch
from .formats.base import FileHandles, RankWriter, aligned_empty
from .fsutil import fault, write_failure
from .formats.manifest import FileRecord
from .layout import ParamLayout
from .plan import Plan, RankPlan, ShardPlan

log = logging.getLogger(__name__)

PROGRESS_BYTES = 512 << 20  # with on_progress: fsync and journal the open files' state this often (--resume)
GC_BYTES = 4 << 20  # collect the young generation after parameters this big (1 ms), so buffers never pile up

WriterFactory = Callable[[Path, list[tuple[str, np.dtype, tuple[int, ...]]], RankPlan], RankWriter]


def ensure_cpu_devices(count: int) -> None:
    """Make sure JAX will have at least `count` CPU devices (fake ones on a plain CPU host).

    Must run before JAX initialises its backends; afterwards only a check is possible, and a clear error
    tells the user how to get enough devices.
    """
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(count, 1)}".strip()
    import jax

    try:
        have = len(jax.devices("cpu"))
    except RuntimeError:
        have = 0
    if have < count:
        try:  # possible only while no backend has been initialised yet
            jax.config.update("jax_num_cpu_devices", count)
            have = len(jax.devices("cpu"))
        except Exception:  # noqa: BLE001 - the check below reports the real problem
            pass
    if have < count:
        raise LayoutError(
            f"the destination layout needs {count} devices per stage but JAX has {have} CPU devices; set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before importing jax, or run the CLI"
        )


def make_mesh(layout: ParamLayout, devices: Sequence[Any]) -> Any:
    from jax.sharding import Mesh

    n = layout.devices_per_stage
    arr = np.empty(n, dtype=object)
    arr[:] = list(devices[:n])
    return Mesh(arr.reshape(layout.mesh_shape), layout.axis_names)


def execute(
    plan: Plan,
    dst_dir: Path,
    make_writer: WriterFactory,
    *,
    on_bytes: Callable[..., None] = lambda n, param=None: None,
    on_file: Callable[[str, FileRecord], None] = lambda rel, record: None,
    on_progress: Callable[[int, dict[str, tuple[int, str]]], None] | None = None,
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
    n_needed = max((info.dst_layout.devices_per_stage for info in plan.params.values()), default=1)
    ensure_cpu_devices(n_needed)  # before JAX is imported, so fake CPU devices can still be created
    import jax
    from jax.sharding import NamedSharding

    devices = sorted(jax.devices("cpu"), key=lambda d: (d.process_index, d.id))  # rank r = device r, by process
    writers: dict[int, RankWriter] = {}
    files = {rank.dst_rank: rank.dst_file for rank in plan.ranks}
    users: dict[str, dict[ShardPlan, list[int]]] = {p: {} for p in plan.params}
    for rank in plan.ranks:
        entries = [(s.param, plan.params[s.param].dst_dtype, s.dst_box.shape) for s in rank.shards]
        with _writing(rank.dst_file):
            writers[rank.dst_rank] = make_writer(dst_dir / rank.dst_file, entries, rank)
        for shard in rank.shards:
            users[shard.param].setdefault(shard, []).append(rank.dst_rank)
    meshes: dict[tuple[tuple[str, int], ...], Any] = {}

    def emit(param: str, data: np.ndarray, ranks: list[int]) -> None:
        info = plan.params[param]
        out = data if info.dst_dtype == info.src_dtype else data.astype(info.dst_dtype)
        for rank in ranks:
            with _writing(files[rank]):
                writers[rank].write(param, out)
            on_bytes(out.nbytes)

    def write_param(param: str, handles: FileHandles) -> None:
        """One parameter, start to finish; its buffers die with this frame (before the next is allocated)."""
        info, shards = plan.params[param], users[param]
        if info.direct or len({s.dst_box for s in shards}) < len(shards):
            # per-rank copies (MindSpore pass-through, or replicas deliberately read from different source
            # ranks): not one consistent sharded array, so written directly, one box at a time
            for shard, ranks in shards.items():
                buf = aligned_empty(shard.dst_box.shape, info.src_dtype)
                fill_boxes(plan, [(shard, buf)], handles)
                if info.fold is not None:
                    info.fold.apply(param, [(shard.dst_box, buf)])
                emit(param, buf, ranks)
            return
        layout = info.dst_layout
        mesh = meshes.get(layout.mesh_axes)
        if mesh is None:
            mesh = meshes[layout.mesh_axes] = make_mesh(layout, devices)
        by_box = {s.dst_box: s for s in shards}
        array = build_array(plan, param, by_box, NamedSharding(mesh, layout.partition_spec()), handles)
        n = layout.devices_per_stage
        local_of = {d.id: i for i, d in enumerate(mesh.devices.flat)}
        for piece in array.addressable_shards:  # each rank gets the shard of its own device
            shard = by_box.get(Box.from_index(piece.index[: len(info.shape)], info.shape))
            if shard is not None:
                ranks = [r for r in shards[shard] if r % n == local_of[piece.device.id]]
                emit(param, _from_jax(np.asarray(piece.data), info.src_dtype), ranks)
        array.delete()  # release the device buffers (our aliased host memory) now, not at some later collection

    position = {p: i for i, p in enumerate(plan.params)}
    order = [p for p in plan.params if users[p]]
    last_of: dict[str, list[int]] = {}  # parameter -> ranks whose file is complete once it is written
    for rank in plan.ranks:
        mine = {s.param for s in rank.shards}
        last = next((p for p in reversed(order) if p in mine), None)
        if last is not None:
            last_of.setdefault(last, []).append(rank.dst_rank)
    done: dict[str, FileRecord] = {}
    unsynced = [0]

    def progress(param: str) -> None:
        """fsync the open files and report how far they are written, every PROGRESS_BYTES."""
        info = plan.params[param]
        unsynced[0] += sum(s.dst_box.size * len(r) for s, r in users[param].items()) * info.dst_dtype.itemsize
        if on_progress is None or unsynced[0] < PROGRESS_BYTES or not writers:
            return
        unsynced[0] = 0
        states: dict[str, tuple[int, str]] = {}
        for writer in writers.values():
            state = writer.sync() if hasattr(writer, "sync") else None
            if state is None:
                return  # written out of file order: nothing a rerun could continue
            states.update({Path(p).relative_to(dst_dir).as_posix(): v for p, v in state.items()})
        on_progress(position[param] + 1, states)

    def close(rank: int) -> None:
        writer = writers.pop(rank)
        try:
            with _writing(files[rank]):
                records = writer.close() or {}
        except BaseException:
            writer.abort()
            raise
        fault("file-closed")
        for path, record in records.items():
            rel = Path(path).relative_to(dst_dir).as_posix()
            done[rel] = record
            on_file(rel, record)

    try:
        with FileHandles() as handles:
            order = [p for p in order if position[p] >= skip]  # the rest are in the continued files
            for i, param in enumerate(order):
                if i + 1 < len(order):
                    prefetch(plan, list(users[order[i + 1]]), handles)
                try:
                    write_param(param, handles)
                except OSError as e:
                    raise FormatError(f"parameter {param!r}: reading the source failed: {e}") from e
                on_bytes(0, param)
                fault("param-written")
                for rank in last_of.get(param, ()):
                    close(rank)
                progress(param)
                if plan.params[param].src_dtype.itemsize * math.prod(plan.params[param].shape) >= GC_BYTES:
                    gc.collect(1)  # make_array_from_callback leaves a reference cycle holding our buffers
        for rank in list(writers):  # ranks with text entries only
            close(rank)
    except BaseException:
        for writer in writers.values():  # release file descriptors; the caller removes the partial output
            writer.abort()
        raise
    return done


@contextlib.contextmanager
def _writing(file: str) -> Iterator[None]:
    """An OSError while writing `file` (a path under the destination) is the destination's fault (full,
    read-only, quota), not the source's: say so, naming the file."""
    try:
        yield
    except OSError as e:
        raise write_failure(e, file) from None


def _jax_dtype(dtype: np.dtype) -> tuple[np.dtype, tuple[int, ...]]:
    """JAX canonicalises 64-bit types to 32 bits unless x64 is on: carry them as uint32 pairs instead, so
    bytes are never converted and the user's global `jax_enable_x64` setting is left alone."""
    if dtype.itemsize == 8:
        return np.dtype(np.uint32), (2,)
    return dtype, ()


def _from_jax(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.itemsize == 8 and data.dtype != dtype:  # carried as uint32 pairs (sources that restore arrays
        # themselves, like orbax, hand back the real dtype)
        return data.reshape(-1).view(dtype).reshape(data.shape[:-1])
    return data


def build_array(
    plan: Plan, param: str, shards: dict[Box, ShardPlan], sharding: Any, handles: FileHandles, *, native: bool = False
) -> Any:  # fmt: skip
    """The destination array of `param`: every needed box read up front (few large reads, see fill.py), then
    handed to `make_array_from_callback` as aligned buffers JAX aliases instead of copying.

    For rank files (`native=False`) the array keeps the source dtype, 64-bit types carried as uint32 pairs; for
    arrays handed to the user or to orbax (`native=True`) it has the destination dtype itself.
    """
    import jax

    info = plan.params[param]
    if info.restore is not None:  # a source that reshards on read (orbax)
        return info.restore.restore(param, sharding, info.dst_dtype if native else info.src_dtype)
    bufs = {box: aligned_empty(box.shape, info.src_dtype) for box in shards}
    fill_boxes(plan, [(shard, bufs[box]) for box, shard in shards.items()], handles)
    if info.fold is not None:
        info.fold.apply(param, list(bufs.items()))
    dtype = info.dst_dtype if native else info.src_dtype
    if dtype != info.src_dtype:
        for box, buf in list(bufs.items()):
            cast = bufs[box] = aligned_empty(box.shape, dtype)
            np.copyto(cast, buf, casting="unsafe")
    jax_dtype, tail = (dtype, ()) if native else _jax_dtype(dtype)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        box = Box.from_index(index[: len(info.shape)], info.shape)
        buf = bufs.get(box)
        if buf is None:  # a box no planned rank needs (with --ranks): untouched memory, never written out
            buf = bufs[box] = aligned_empty(box.shape, dtype)
        return buf.reshape(-1).view(jax_dtype).reshape(buf.shape + tail) if tail else buf

    return jax.make_array_from_callback(info.shape + tail, sharding, callback, dtype=jax_dtype)
