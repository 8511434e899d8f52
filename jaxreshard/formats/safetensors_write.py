"""safetensors writing: a header-first writer that streams tensors to their offsets.

Files we write are ordinary safetensors files that `safetensors.safe_open` reads; they are written header first
and filled at computed offsets, so no rank file is ever held in memory. The bytes are hashed as they go, for
the manifest and `--resume`. Writes go behind (`writebehind.py`): `write` returns while its bytes are
written on the write pool, so rank files fill side by side; `sync` and `close` wait for them.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from .manifest import FileRecord, StreamingHash
from .safetensors_dtypes import DTYPE_CODES
from .storage import ByteWriter, storage_for
from .writebehind import WriteBehind


def header_bytes(params: Sequence[tuple[str, np.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length + JSON header for tensors stored back to back in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for param, dtype, shape in params:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[param] = {"dtype": DTYPE_CODES[np.dtype(dtype)], "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Writes one safetensors file: the header at open, then each tensor at its offset as it arrives; the
    bytes are hashed as they go (`close` returns the file's size and SHA-256 for the manifest)."""

    def __init__(
        self,
        path: Path,
        params: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
        resume: tuple[int, Any] | None = None,
    ) -> None:
        """`resume`: (n, hashlib sha256 of the first n bytes) continues a file a killed run wrote that far;
        the tensors lying wholly in those bytes are taken as written."""
        self.path = Path(path)
        head = header_bytes(params, metadata)
        self._slots: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        offset = len(head)
        for param, dtype, shape in params:
            self._slots[param] = (offset, np.dtype(dtype), tuple(shape))
            offset += math.prod(shape) * np.dtype(dtype).itemsize
        self._size = offset
        self._hash = StreamingHash(resume)
        if resume is not None:
            self._pending = {p for p, (o, d, shp) in self._slots.items() if o + math.prod(shp) * d.itemsize > resume[0]}
            self._out: ByteWriter | None = WriteBehind(storage_for(self.path).reopen(self.path))
            if self._out.size() != offset:
                self._out.abort()
                raise FormatError(f"{self.path}: cannot be continued: it is not {offset} bytes long")
            return
        self._pending = set(self._slots)
        out = WriteBehind(storage_for(self.path).create(self.path, offset))
        out.write_at(0, [head])
        out.flush()  # the header is on disk before any tensor: a new file is a valid (zero-filled) one at once
        self._out = out
        self._hash.update(0, head)

    def _open(self) -> ByteWriter:
        if self._out is None:
            raise ValueError(f"{self.path}: the writer is closed")
        return self._out

    def write(self, param: str, array: np.ndarray) -> None:
        offset, dtype, shape = self._slots[param]
        if array.dtype != dtype or array.shape != shape:
            raise ValueError(f"{self.path}: {param!r} expects {dtype}{list(shape)}, "
                             f"got {array.dtype}{list(array.shape)}")
        array = np.ascontiguousarray(array)  # safetensors stores C order; never write a strided view's memory
        # an ndarray exports the buffer protocol; numpy's stubs declare `__buffer__` for Python 3.12+ only
        data = memoryview(array.reshape(-1).view(np.uint8))  # pyright: ignore[reportArgumentType]
        self._open().write_at(offset, [data])
        self._hash.update(offset, data)
        self._pending.discard(param)

    def sync(self) -> dict[Path, tuple[int, str]] | None:
        """fsync, and (n, SHA-256 of the first n bytes) of what is written so far in file order (for
        `--resume`); None when tensors arrived out of file order."""
        self._open().sync()
        snap = self._hash.snapshot()
        return None if snap is None else {self.path: snap}

    def abort(self) -> None:
        """Close without completing (a file this writer created is removed; the caller discards the rest)."""
        if self._out is not None:
            out, self._out = self._out, None
            out.abort()

    def close(self) -> dict[Path, FileRecord]:
        """fsync and close; the complete file's size and SHA-256."""
        if self._pending:
            self.abort()
            raise RuntimeError(f"{self.path}: closed with unwritten parameters {sorted(self._pending)[:5]}")
        out = self._open()
        self._out = None
        out.close()
        return {self.path: FileRecord(self._size, self._hash.digest(self.path, self._size))}


def split_into_files(nbytes: Sequence[int], max_file_bytes: int | None) -> list[list[int]]:
    """Indices of tensors per output file: greedy in order, a new file when the next tensor would overflow.

    A tensor larger than `max_file_bytes` gets a file of its own (like huggingface_hub's planner).
    """
    files: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(nbytes):
        if max_file_bytes is not None and files[-1] and size + n > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(i)
        size += n
    return files
