"""What every format shares: a tensor index entry, region reads, aligned buffers, and the writer protocol.

A format's reader only parses headers into `TensorEntry`s (where each tensor's bytes lie in its file);
reading any box of any tensor is the same code for every format, through the location's `storage.Storage`
(`preadv` for local files) into buffers this module allocates 64-byte aligned (JAX on CPU aliases such buffers
instead of copying them: 0.23 GB/s and 2x memory otherwise, measured with jax 0.10 on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os  # noqa: F401 -- tests patch `base.os.pwritev` (the module is shared) to inject short writes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..box import Box, byte_runs
from ..errors import FormatError
from . import iopool
from .iopool import ReadBatch
from .manifest import FileRecord
from .storage import ByteReader, storage_for
from .storage import pwrite_all as pwrite_all  # the old home of the local write loop (tests call it here)

ALIGNMENT = 64  # bytes; XLA's CPU client aliases host buffers only at this alignment


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor stored in one file: its bytes are the concatenation of `segments`, in C order.

    Most formats store a tensor in one segment; MindSpore `.ckpt` splits big ones into 512 MiB records.
    """

    param: str
    dtype: np.dtype
    shape: tuple[int, ...]
    path: Path
    segments: tuple[tuple[int, int], ...]  # (file offset, nbytes)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def aligned_empty(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(tuple(shape))


class FileHandles:
    """Readers of source files, opened on first use (through the location's `Storage`) and closed together, and
    the batch of reads `read_box` adds to (see `batch`)."""

    def __init__(self) -> None:
        self._readers: dict[Path, ByteReader] = {}
        self._current: ReadBatch | None = None
        self._batches: list[ReadBatch] = []

    def reader(self, path: Path) -> ByteReader:
        reader = self._readers.get(path)
        if reader is None:
            reader = storage_for(path).open_read(path)
            self._readers[path] = reader
        return reader

    def new_batch(self) -> ReadBatch:
        """An empty batch on the read pool, settled by `close` if its owner never waits for it."""
        self._batches = [b for b in self._batches if b.pending]
        batch = ReadBatch(iopool.pool("read"))
        self._batches.append(batch)
        return batch

    @contextlib.contextmanager
    def batch(self, into: ReadBatch | None = None) -> Iterator[ReadBatch]:
        """`read_box` calls inside only submit their reads, to `into` (its owner waits for it), else to the
        batch already open; a batch opened here is waited for at the end, so every read is in place after it."""
        if into is None and self._current is not None:
            yield self._current
            return
        outer, batch = self._current, into if into is not None else self.new_batch()
        self._current = batch
        try:
            yield batch
        except BaseException:
            if into is None:
                batch.settle()
            raise
        finally:
            self._current = outer
        if into is None:
            batch.wait()

    def close(self) -> None:
        for batch in self._batches:  # no pool thread may still read from a descriptor closed here
            batch.settle()
        self._batches.clear()
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> FileHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


READ_CHUNK = 8 << 20  # a longer run is read as pieces of this size, several in flight at once


def read_box(handles: FileHandles, entry: TensorEntry, box: Box, out: np.ndarray) -> None:
    """Read `box` (in the entry's own coordinates) of `entry` into `out`, a C-contiguous array of box shape.

    Each contiguous run of the box is read with `readinto` (locally `preadv`) straight into its place in `out`,
    long runs as pieces in parallel on the read pool; runs closer in the file than the reader's `coalesce_gap`
    are read as one range and cut apart. Both are optional reader attributes (`coalesce_gap`, default 0: no
    byte more than wanted; `read_chunk`, default `READ_CHUNK`: the most one request reads). Inside
    `handles.batch()` the reads are only submitted; otherwise they are done when this returns.
    """
    if out.shape != box.shape or not out.flags.c_contiguous:
        raise ValueError(f"read_box: out has shape {out.shape}, box {box} needs {box.shape}")
    reader = handles.reader(entry.path)
    # an ndarray exports the buffer protocol; numpy's stubs declare `__buffer__` for Python 3.12+ only
    dst = memoryview(out.reshape(-1).view(np.uint8))  # pyright: ignore[reportArgumentType]
    runs, pos = [], 0
    for offset, nbytes in byte_runs(box, entry.shape, entry.dtype.itemsize):
        for file_offset, chunk in _segment_ranges(entry, offset, nbytes):
            runs.append((file_offset, chunk, pos))
            pos += chunk
    with handles.batch() as batch:
        for group in coalesce(runs, getattr(reader, "coalesce_gap", 0), getattr(reader, "read_chunk", READ_CHUNK)):
            span = group[-1][0] + group[-1][1] - group[0][0]
            batch.submit(functools.partial(_read_group, reader, entry, group, dst), span)


Run = tuple[int, int, int]  # (file offset, bytes, position in the destination)


def coalesce(runs: Sequence[Run], gap: int, chunk: int) -> Iterator[list[Run]]:
    """`runs` as groups each read with one request: a run longer than `chunk` alone in pieces of `chunk`; runs
    in increasing file order at most `gap` apart together while the group spans at most `chunk` bytes."""
    group: list[Run] = []
    for offset, nbytes, pos in runs:
        if nbytes > chunk:
            if group:
                yield group
                group = []
            for start in range(0, nbytes, chunk):
                yield [(offset + start, min(chunk, nbytes - start), pos + start)]
            continue
        if group:
            end = group[-1][0] + group[-1][1]
            if 0 <= offset - end <= gap and offset + nbytes - group[0][0] <= chunk:
                group.append((offset, nbytes, pos))
                continue
            yield group
        group = [(offset, nbytes, pos)]
    if group:
        yield group


def _read_group(reader: ByteReader, entry: TensorEntry, group: list[Run], dst: memoryview) -> None:
    """One request for `group`: straight into `dst` when it is one range there too, else into a scratch
    buffer cut into the runs' places (runs too close in the file to be worth a request each)."""
    first, (last_off, last_n, last_pos) = group[0], group[-1]
    span = last_off + last_n - first[0]
    if last_pos + last_n - first[2] == span:  # contiguous in the file and in `dst`: read in place
        got = reader.readinto(first[0], dst[first[2] : first[2] + span])
        scratch = None
    else:
        scratch = memoryview(np.empty(span, np.uint8))  # pyright: ignore[reportArgumentType]
        got = reader.readinto(first[0], scratch)
    for offset, nbytes, pos in group:
        if offset + nbytes - first[0] > got:
            raise FormatError(
                f"{entry.path}: parameter {entry.param!r} is truncated: wanted {nbytes} bytes at offset "
                f"{offset}, the file ends first; it is shorter than its header says"
            )
        if scratch is not None:
            dst[pos : pos + nbytes] = scratch[offset - first[0] : offset - first[0] + nbytes]


def _segment_ranges(entry: TensorEntry, offset: int, nbytes: int) -> Iterator[tuple[int, int]]:
    """Map a byte range of the tensor onto file ranges through its segments."""
    if len(entry.segments) == 1:
        yield entry.segments[0][0] + offset, nbytes
        return
    seg_start = 0
    for file_offset, seg_len in entry.segments:
        seg_end = seg_start + seg_len
        if offset < seg_end and offset + nbytes > seg_start:
            lo = max(offset, seg_start)
            hi = min(offset + nbytes, seg_end)
            yield file_offset + (lo - seg_start), hi - lo
        seg_start = seg_end


class RankWriter(Protocol):
    """Writes one destination rank's file. The parameter list is fixed up front so headers go first and
    tensors stream to computed offsets; `close` makes the file complete (fsynced) and returns the size and
    SHA-256 of every file it wrote (hashed while writing), for the manifest and `--resume`'s journal."""

    def write(self, param: str, array: np.ndarray) -> None: ...

    def close(self) -> dict[Path, FileRecord]: ...

    def abort(self) -> None: ...  # release resources without completing (the caller discards the output)
