"""Filling destination buffers from source files with few, large reads.

A region that is contiguous both in its source file and in its destination buffer (row blocks) is read
straight into place with one `preadv`. Strided regions (column blocks) would cost one small read per row,
which is slow on a cold disk (1 MiB reads: 0.97 GB/s vs 64 MiB: 1.7 GB/s, measured on the README's benchmark VM), so
when a parameter's strided regions cover their source rows completely, those rows are read once in slabs of
`SLAB_BYTES` and every destination box cuts its columns from the slab: each source byte is read once, in big
requests, and the extra memory is one slab. Otherwise only the wanted runs are read, never a byte more.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .box import Box, byte_runs, is_contiguous
from .composed import Piece, arrange, src_view
from .formats.base import FileHandles, TensorEntry, aligned_empty, read_box
from .plan import Plan, ShardPlan

SLAB_BYTES = 64 << 20  # reads this big run at full disk speed cold; small next to any tensor worth slabbing


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
    strided: dict[tuple[int, str], list[tuple[Box, np.ndarray]]] = defaultdict(list)
    for shard, buf in targets:
        for item in shard.reads:
            entry = plan.src_entries[item.src_rank][shard.param]
            src_region = item.region.relative_to(item.src_box)
            dst_region = item.region.relative_to(shard.dst_box)
            view = buf if dst_region == Box.full(buf.shape) else buf[dst_region.to_slices()]
            if view.flags.c_contiguous and is_contiguous(src_region, entry.shape):
                read_box(handles, entry, src_region, view)  # one read, straight into place
            else:
                strided[(item.src_rank, shard.param)].append((src_region, view))
    for (src_rank, param), pieces in strided.items():
        _read_strided(handles, plan.src_entries[src_rank][param], pieces)


def _read_strided(handles: FileHandles, entry: TensorEntry, pieces: list[tuple[Box, np.ndarray]]) -> None:
    lo = min(region.start[0] for region, _ in pieces)
    hi = max(region.stop[0] for region, _ in pieces)
    row_bytes = int(np.prod(entry.shape[1:], dtype=np.int64)) * entry.dtype.itemsize
    wanted = sum(region.size for region, _ in pieces) * entry.dtype.itemsize
    if wanted < (hi - lo) * row_bytes:  # not every byte of the rows is wanted: read just the regions, run by run
        # (a process must read only what its own devices need, e.g. one host of a multi-host load)
        for region, view in pieces:
            tmp = aligned_empty(region.shape, entry.dtype)
            read_box(handles, entry, region, tmp)
            view[...] = tmp
        return
    rows = max(1, SLAB_BYTES // max(row_bytes, 1))
    slab_buf = aligned_empty((min(rows, hi - lo), *entry.shape[1:]), entry.dtype)
    rest = tuple(0 for _ in entry.shape[1:]), tuple(entry.shape[1:])
    for r0 in range(lo, hi, rows):
        r1 = min(hi, r0 + rows)
        slab = slab_buf[: r1 - r0]
        read_box(handles, entry, Box((r0, *rest[0]), (r1, *rest[1])), slab)
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
