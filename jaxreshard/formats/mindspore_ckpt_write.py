"""Writing MindSpore `.ckpt` files whose bytes equal `mindspore.save_checkpoint`'s, streamed: every record is
sized up front (fields in number order, unpacked dims, 512 MiB byte chunks with full dims in each, as
`save_checkpoint` writes them), so each tensor is written at its offset when it arrives and no file is ever held
in memory. Writes go behind (`writebehind.py`): several rank files fill side by side."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .manifest import FileRecord, StreamingHash
from .mindspore_ckpt import CRC_MARKER, ckpt_dtype_name
from .storage import storage_for
from .writebehind import WriteBehind

RECORD_CHUNK_BYTES = 536_870_912  # save_checkpoint's byte chunk per record; read at use, so tests can shrink it


def _enc_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _record_header(tag: str, dims: Sequence[int], type_name: str, content_len: int) -> bytes:
    """All bytes of one record before its tensor_content (fields in number order, unpacked dims: what the protobuf
    runtime writes, tests/formats/test_mindspore_ckpt.py::test_record_header_equals_protobuf_runtime)."""
    tag_b, type_b = tag.encode("utf-8"), type_name.encode("ascii")
    tp = b"".join(b"\x08" + _enc_varint(d) for d in dims)
    tp += b"\x12" + _enc_varint(len(type_b)) + type_b + b"\x1a" + _enc_varint(content_len)
    tp_len = len(tp) + content_len
    value_head = b"\x0a" + _enc_varint(len(tag_b)) + tag_b + b"\x12" + _enc_varint(tp_len)
    return b"\x0a" + _enc_varint(len(value_head) + tp_len) + value_head + tp


def _str_content(text: str) -> bytes:
    """`np.array(text).tobytes()`, as save_checkpoint stores a str: UTF-32LE, at least one (NUL) character."""
    return text.encode("utf-32-le") or b"\0\0\0\0"


class CkptRankWriter:
    """Streams one `.ckpt` with save_checkpoint's exact bytes: every record is sized up front, so each tensor
    goes to its computed offset whenever `write` gets it, in any order, with one `pwritev` per record."""

    def __init__(self, path: Path, params: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
                 extras: Mapping[str, str] | None = None, order: Sequence[str] | None = None, *, crc: bool = False):
        self.path, self._crc = Path(path), crc
        self._specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        for name, dtype, shape in params:
            shape = tuple(int(d) for d in shape)
            if name in self._specs:
                raise ValueError(f"{self.path}: parameter {name!r} is listed twice")
            if any(d < 0 for d in shape) or shape == (0,):
                raise ValueError(f"{self.path}: parameter {name!r} has shape {shape}, which a .ckpt cannot hold")
            self._specs[name] = (np.dtype(dtype), shape)
        extras = dict(extras or {})
        order = list(order) if order is not None else [*self._specs, *extras]
        everything = set(self._specs) | set(extras)
        if len(everything) != len(self._specs) + len(extras) or sorted(order) != sorted(everything):
            raise ValueError(f"{self.path}: `order` must list every parameter and extra exactly once")
        self._records: dict[str, list[tuple[int, bytes, int, int]]] = {}  # (offset, header, tensor byte, nbytes)
        strings: list[tuple[int, bytes]] = []
        pos, chunk = 0, RECORD_CHUNK_BYTES
        for name in order:
            if name in extras:
                content = _str_content(extras[name])
                record = _record_header(name, [0], "str", len(content)) + content
                strings.append((pos, record))
                pos += len(record)
                continue
            dtype, shape = self._specs[name]
            type_name, nbytes = ckpt_dtype_name(dtype), math.prod(shape) * dtype.itemsize
            self._records[name] = []
            for start in range(0, nbytes, chunk) if nbytes else [0]:
                n = min(chunk, nbytes - start)
                header = _record_header(name, shape, type_name, n)
                self._records[name].append((pos, header, start, n))
                pos += len(header) + n
        self.size = pos  # bytes before any CRC trailer
        self._written: set[str] = set()
        self._hash = StreamingHash()  # in file order unless text entries sit between tensors (then re-read)
        trailer = len(CRC_MARKER) + 10 if crc else 0  # sized now, filled by `close`
        self._out: WriteBehind | None = WriteBehind(storage_for(self.path).create(self.path, pos + trailer))
        for offset, record in strings:
            self._out.write_at(offset, [record])
            self._hash.update(offset, record)

    def write(self, param: str, array: np.ndarray) -> None:
        """Write one whole parameter: a C-contiguous array of exactly the declared dtype and shape."""
        if param not in self._specs:
            raise ValueError(f"{self.path}: parameter {param!r} was not declared to this writer")
        dtype, shape = self._specs[param]
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
            got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
            raise ValueError(f"{self.path}: parameter {param!r} must be a numpy {dtype} {shape}, got {got}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{self.path}: parameter {param!r} must be C-contiguous")
        if param in self._written:
            raise ValueError(f"{self.path}: parameter {param!r} was already written")
        if self._out is None:
            raise ValueError(f"{self.path}: the writer is closed")
        # an ndarray exports the buffer protocol; numpy's stubs declare `__buffer__` for Python 3.12+ only
        data = memoryview(array.reshape(-1).view(np.uint8))  # pyright: ignore[reportArgumentType]
        for offset, header, start, n in self._records[param]:
            self._out.write_at(offset, [header, data[start : start + n]])
            self._hash.update(offset, header)
            self._hash.update(offset + len(header), data[start : start + n])
        self._written.add(param)

    def close(self) -> dict[Path, FileRecord]:
        """Append the CRC trailer if asked, fsync and close; ValueError if a parameter was never written.
        Returns the complete file's size and SHA-256 (for the manifest)."""
        if self._out is None:
            return {}
        missing = [name for name in self._specs if name not in self._written]
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: closed before parameters {missing} were written; the file is incomplete")
        if self._crc:
            try:
                self._out.flush()  # the CRC is read back from the file: every record must be in it
                trailer = CRC_MARKER + self._crc32().to_bytes(10, "big")
                self._out.write_at(self.size, [trailer])
            except BaseException:
                self.abort()
                raise
            self._hash.update(self.size, trailer)
        out, self._out = self._out, None
        out.close()
        size = self.size + (len(CRC_MARKER) + 10 if self._crc else 0)
        return {self.path: FileRecord(size, self._hash.digest(self.path, size))}

    def _crc32(self) -> int:
        """The CRC-32 of the records as written, read back (`save_checkpoint` appends it after them)."""
        reader = storage_for(self.path).open_read(self.path)
        try:
            crc, buf = 0, memoryview(bytearray(1 << 24))
            for offset in range(0, self.size, len(buf)):
                n = reader.readinto(offset, buf[: min(len(buf), self.size - offset)])
                crc = zlib.crc32(buf[:n], crc)
            return crc
        finally:
            reader.close()

    def abort(self) -> None:
        """Close without completing (error paths): the file this writer created is removed."""
        if self._out is not None:
            out, self._out = self._out, None
            out.abort()

    def __enter__(self) -> CkptRankWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close() if exc_type is None else self.abort()


def write_ckpt(path: Path, tensors: Mapping[str, np.ndarray | str], *, crc: bool = False) -> None:
    """Write a whole `.ckpt` from memory (tests, small files). Python `int`/`float`/`bool` become Int64/Float32/
    Bool scalars and `str` becomes a str record, as in save_checkpoint's `append_dict`."""
    arrays: dict[str, np.ndarray] = {}
    extras: dict[str, str] = {}
    for name, value in tensors.items():
        if isinstance(value, str):
            extras[name] = value
        else:
            arrays[name] = np.asarray(value, {bool: bool, int: np.int64, float: np.float32}.get(type(value)), order="C")
    params = [(name, a.dtype, a.shape) for name, a in arrays.items()]
    with CkptRankWriter(path, params, extras, list(tensors), crc=crc) as writer:
        for name, array in arrays.items():
            writer.write(name, array)
