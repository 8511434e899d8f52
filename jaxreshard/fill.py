"""Filling destination buffers from source files with few, large reads, many in flight at once.

A region that is contiguous both in its source file and in its destination buffer (row blocks) is read
straight into place (`read_box`: `READ_CHUNK` pieces on the read pool); all such regions of a parameter are in
flight together. Strided regions (column blocks) would cost one small read per row, which is slow on a cold
disk (1 MiB reads: 0.97 GB/s vs 64 MiB: 1.7 GB/s one at a time, measured on the README's benchmark VM), so
when a parameter's strided regions cover their source rows completely, those rows are read once in slabs of
`SLAB_BYTES` and every destination box cuts its columns from the slab: each source byte is read once, in big
requests, while the next slab is read (`PIPELINE_DEPTH` slabs of extra memory). Otherwise only the wanted
regions are read (runs the reader's `coalesce_gap` apart or closer as one request; locally a few pages).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from .box import Box, byte_runs, is_contiguous
from .composed import Piece, arrange, src_view
from .formats.base import FileHandles, TensorEntry, aligned_empty, read_box
from .formats.iopool import ReadBatch
from .plan import Plan, ShardPlan

SLAB_BYTES = 32 << 20  # a slab is read as several pieces in flight at once; small next to any tensor worth slabbing
PIPELINE_DEPTH = 2  # slabs (or scratch groups) in memory at once: the next is read while one is cut


def fill_boxes(plan: Plan, targets: Sequence[tuple[ShardPlan, np.ndarray]], handles: FileHandles) -> None:
    """Read every source region of each `(shard, buffer)` into its place in the buffer."""
    targets, permuted = _expand_pieces(plan, targets)
    _fill(plan, targets, handles)
    for piece, view in permuted:  # transposed in memory after the read: one piece's buffer at a time
        tmp = aligned_empty(piece.src_box.shape, view.dtype)
        _fill(plan, [(ShardPlan(piece.part.src_param, piece.src_box, piece.reads), tmp)], handles)
        view[...] = arrange(piece.part, tmp)


def _expand_pieces(plan: Plan, targets: Sequence[tuple[ShardPlan, np.ndarray]]) -> tuple[
        list[tuple[ShardPlan, np.ndarray]], list[tuple[Piece, np.ndarray]]]:  # fmt: skip
    """A composed box's pieces as plain reads straight into their region of the buffer (a view in source
    order); pieces that permute axes are returned apart, with their destination view, to be read one by one."""
    plain, permuted = [], []
    for shard, buf in targets:
        if not shard.pieces:
            plain.append((shard, buf))
            continue
        for piece in shard.pieces:
            view = buf[piece.region.relative_to(shard.dst_box).to_slices()]
            into = src_view(piece.part, view)
            if into is None:
                permuted.append((piece, view))
            else:
                plain.append((ShardPlan(piece.part.src_param, piece.src_box, piece.reads), into))
    return plain, permuted


def _fill(plan: Plan, targets: Sequence[tuple[ShardPlan, np.ndarray]], handles: FileHandles) -> None:
    """Every region read: those contiguous in file and buffer straight into place, all in flight together
    while the strided ones are read (slab by slab) beside them."""
    strided: dict[tuple[int, str], list[tuple[Box, np.ndarray]]] = defaultdict(list)
    direct = handles.new_batch()
    try:
        with handles.batch(direct):
            for shard, buf in targets:
                for item in shard.reads:
                    entry = plan.src_entries[item.src_rank][shard.param]
                    src_region = item.region.relative_to(item.src_box)
                    dst_region = item.region.relative_to(shard.dst_box)
                    view = buf if dst_region == Box.full(buf.shape) else buf[dst_region.to_slices()]
                    if view.flags.c_contiguous and is_contiguous(src_region, entry.shape):
                        read_box(handles, entry, src_region, view)  # submitted: one read, straight into place
                    else:
                        strided[(item.src_rank, shard.param)].append((src_region, view))
        for (src_rank, param), pieces in strided.items():
            _read_strided(handles, plan.src_entries[src_rank][param], pieces)
        direct.wait()
    finally:
        direct.settle()


Step = tuple[Callable[[], None], Callable[[], None]]  # (submit the reads, use what they read)


def _pipeline(handles: FileHandles, steps: Iterable[Step]) -> None:
    """Run `steps` so that the reads of the next `PIPELINE_DEPTH - 1` are in flight while one is used."""
    pending: deque[tuple[ReadBatch, Callable[[], None]]] = deque()
    try:
        for submit, use in steps:
            while len(pending) >= PIPELINE_DEPTH:
                batch, done = pending.popleft()
                batch.wait()
                done()
            batch = handles.new_batch()
            with handles.batch(batch):
                submit()
            pending.append((batch, use))
        while pending:
            batch, done = pending.popleft()
            batch.wait()
            done()
    finally:
        for batch, _ in pending:
            batch.settle()


def _read_strided(handles: FileHandles, entry: TensorEntry, pieces: list[tuple[Box, np.ndarray]]) -> None:
    lo = min(region.start[0] for region, _ in pieces)
    hi = max(region.stop[0] for region, _ in pieces)
    row_bytes = int(np.prod(entry.shape[1:], dtype=np.int64)) * entry.dtype.itemsize
    wanted = sum(region.size for region, _ in pieces) * entry.dtype.itemsize
    if wanted < (hi - lo) * row_bytes:  # not every byte of the rows is wanted: read just the regions
        # (a process must read only what its own devices need, e.g. one host of a multi-host load)
        _pipeline(handles, _region_steps(handles, entry, pieces))
    else:
        _pipeline(handles, _slab_steps(handles, entry, pieces, lo, hi, row_bytes))


def _region_steps(handles: FileHandles, entry: TensorEntry, pieces: list[tuple[Box, np.ndarray]]) -> Iterator[Step]:
    """Regions read into scratch buffers of about `SLAB_BYTES` a step, then copied into their strided views."""
    group: list[tuple[Box, np.ndarray]] = []
    size = 0
    for region, view in pieces:
        nbytes = region.size * entry.dtype.itemsize
        if group and size + nbytes > SLAB_BYTES:
            yield _copy_step(handles, entry, group)
            group, size = [], 0
        group.append((region, view))
        size += nbytes
    if group:
        yield _copy_step(handles, entry, group)


def _copy_step(handles: FileHandles, entry: TensorEntry, group: list[tuple[Box, np.ndarray]]) -> Step:
    scratch: list[np.ndarray] = []

    def submit() -> None:
        for region, _ in group:
            scratch.append(aligned_empty(region.shape, entry.dtype))
            read_box(handles, entry, region, scratch[-1])

    def use() -> None:
        for tmp, (_, view) in zip(scratch, group):
            view[...] = tmp
        scratch.clear()

    return submit, use


def _slab_steps(handles: FileHandles, entry: TensorEntry, pieces: list[tuple[Box, np.ndarray]], lo: int, hi: int,
                row_bytes: int) -> Iterator[Step]:  # fmt: skip
    """The rows `lo:hi` read once, slab by slab (`PIPELINE_DEPTH` slab buffers in turn), every piece cutting
    its columns from each slab."""
    rows = max(1, SLAB_BYTES // max(row_bytes, 1))
    count = min(PIPELINE_DEPTH, -(-(hi - lo) // rows))
    bufs = [aligned_empty((min(rows, hi - lo), *entry.shape[1:]), entry.dtype) for _ in range(count)]
    rest = tuple(0 for _ in entry.shape[1:]), tuple(entry.shape[1:])
    for i, r0 in enumerate(range(lo, hi, rows)):
        r1 = min(hi, r0 + rows)
        slab = bufs[i % count][: r1 - r0]
        box = Box((r0, *rest[0]), (r1, *rest[1]))
        yield (lambda box=box, slab=slab: read_box(handles, entry, box, slab)), \
            (lambda r0=r0, r1=r1, slab=slab: _cut(pieces, slab, r0, r1))  # fmt: skip


def _cut(pieces: list[tuple[Box, np.ndarray]], slab: np.ndarray, r0: int, r1: int) -> None:
    """Copy each piece's part of the slab of rows `r0:r1` into its view."""
    for region, view in pieces:
        a, b = max(region.start[0], r0), min(region.stop[0], r1)
        if a >= b:
            continue
        cols = tuple(slice(s, e) for s, e in zip(region.start[1:], region.stop[1:]))
        view[a - region.start[0] : b - region.start[0]] = slab[(slice(a - r0, b - r0), *cols)]


def prefetch(plan: Plan, shards: Sequence[ShardPlan], handles: FileHandles) -> None:
    """Ask the kernel to start reading the source bytes of `shards` now (locally `POSIX_FADV_WILLNEED`), so the disk
    works on the next parameter while this one is copied and written. Only a hint: errors are ignored."""
    for shard in shards:
        for param, item in shard.source_reads():
            entry = plan.src_entries[item.src_rank][param]
            region = item.region.relative_to(item.src_box)
            runs = list(byte_runs(region, entry.shape, entry.dtype.itemsize)) if region.size else []
            if not runs:
                continue
            first, last = runs[0][0], runs[-1][0] + runs[-1][1]
            try:
                reader = handles.reader(entry.path)
            except OSError:
                continue  # only a hint: the read itself will report the file
            for file_offset, length in entry.segments:  # map the tensor byte span through its segments
                lo, hi = max(first, 0), min(last, length)
                if lo < hi:
                    reader.prefetch(file_offset + lo, hi - lo)
                first, last = first - length, last - length
