"""What every format shares: a tensor index entry, region reads, aligned buffers, and the writer protocol.

A format's reader only parses headers into `TensorEntry`s (where each tensor's bytes lie in its file);
reading any box of any tensor is the same code for every format, through the location's `storage.Storage`
(`preadv` for local files) into buffers this module allocates 64-byte aligned (JAX on CPU aliases such buffers
instead of copying them: 0.23 GB/s and 2x memory otherwise, measured with jax 0.10 on CPU).
"""

from __future__ import annotations

import math
import os  # noqa: F401 -- tests patch `base.os.pwritev` (the module is shared) to inject short writes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..box import Box, byte_runs
from ..errors import FormatError
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
    """Readers of source files, opened on first use (through the location's `Storage`) and closed together."""

    def __init__(self) -> None:
        self._readers: dict[Path, ByteReader] = {}

    def reader(self, path: Path) -> ByteReader:
        reader = self._readers.get(path)
        if reader is None:
            reader = storage_for(path).open_read(path)
            self._readers[path] = reader
        return reader

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> FileHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_box(handles: FileHandles, entry: TensorEntry, box: Box, out: np.ndarray) -> None:
    """Read `box` (in the entry's own coordinates) of `entry` into `out`, a C-contiguous array of box shape.

    Each contiguous run of the box is read with one `readinto` (locally one `preadv`) straight into its place in
    `out`, so rows and row blocks cost one system call and no extra copy; column blocks cost one call per row.
    """
    if out.shape != box.shape or not out.flags.c_contiguous:
        raise ValueError(f"read_box: out has shape {out.shape}, box {box} needs {box.shape}")
    reader = handles.reader(entry.path)
    # an ndarray exports the buffer protocol; numpy's stubs declare `__buffer__` for Python 3.12+ only
    dst = memoryview(out.reshape(-1).view(np.uint8))  # pyright: ignore[reportArgumentType]
    pos = 0
    for offset, nbytes in byte_runs(box, entry.shape, entry.dtype.itemsize):
        for file_offset, chunk in _segment_ranges(entry, offset, nbytes):
            if reader.readinto(file_offset, dst[pos : pos + chunk]) < chunk:
                raise FormatError(
                    f"{entry.path}: parameter {entry.param!r} is truncated: wanted {chunk} bytes at offset "
                    f"{file_offset}, the file ends first; it is shorter than its header says"
                )
            pos += chunk


def _segment_ranges(entry: TensorEntry, offset: int, nbytes: int):
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
