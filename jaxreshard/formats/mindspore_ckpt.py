"""MindSpore `.ckpt` files, read without MindSpore and without the protobuf runtime (writing: mindspore_ckpt_write).

Why by hand: MindSpore parses a whole file into memory (and refuses files larger than free RAM). A
`.ckpt` is a concatenation of one-`Value` protobuf records of a fixed shape, so walking the wire
format over an mmap finds where every tensor's bytes lie without touching them, and the writer can size every
record up front and stream each tensor to its offset. The writer's bytes equal `mindspore.save_checkpoint`'s.

Reader semantics follow `load_checkpoint`: a `crc_num` trailer is always stripped (checked on request);
consecutive records with one tag are one tensor (`save_checkpoint` splits a tensor into 512 MiB chunks);
`dims == [0]` means a scalar; a tag seen again later replaces the earlier value but keeps its first position
(MindSpore fills a dict). `str` records are
"extras" (Python strings). Int4 and MapTensor records are refused with a FormatError naming the parameter:
`transform_checkpoints` cannot convert them either, and skipping them silently would drop data.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import FormatError
from .base import TensorEntry
from .storage import storage_for
from .untrusted import MAX_DIMS, NotACheckpoint, check_name, open_regular

CRC_MARKER = b"crc_num"  # trailer: marker + 10-byte big-endian CRC-32 of all preceding bytes
ENCRYPTED_MAGICS = (0x7F3A5ED8, 0x7F3A5ED9)  # little-endian uint32 at the start of AES-GCM / CBC blocks
# MindSpore's optimizers keep a state per trainable weight named "<prefix>.<weight>" (`Parameter.clone(prefix=...)`:
# Adam's moments, gradient accumulation). transform_checkpoints tests the bare prefixes when it chooses its
# by-stage path; "<prefix>." is how a state's name starts (the LoRA merge drops or keeps them as a group).
OPTIMIZER_PREFIXES = ("adam_m", "adam_v", "accu_grads")
OPTIMIZER_STATE_PREFIXES = tuple(f"{p}." for p in OPTIMIZER_PREFIXES)

_DTYPES: dict[str, np.dtype] = {
    "Float16": np.dtype("<f2"), "Float32": np.dtype("<f4"), "Float64": np.dtype("<f8"),
    "BFloat16": np.dtype(ml_dtypes.bfloat16),
    "Int8": np.dtype("i1"), "Int16": np.dtype("<i2"), "Int32": np.dtype("<i4"), "Int64": np.dtype("<i8"),
    "UInt8": np.dtype("u1"), "UInt16": np.dtype("<u2"), "UInt32": np.dtype("<u4"), "UInt64": np.dtype("<u8"),
    "Bool": np.dtype(bool),
}  # fmt: skip
_NAMES: dict[np.dtype, str] = {dt: name for name, dt in _DTYPES.items()}
_UNSUPPORTED = {"Int4": "packed int4 (qint4x2)"}


def ckpt_dtype_name(dtype: np.dtype) -> str:
    """The `tensor_type` string MindSpore writes for a numpy dtype (ValueError if it has none)."""
    if (name := _NAMES.get(np.dtype(dtype))) is None:
        raise ValueError(f"dtype {np.dtype(dtype)} cannot be stored in a MindSpore .ckpt; supported: {sorted(_DTYPES)}")
    return name


def ckpt_dtype(name: str) -> np.dtype:
    """The numpy dtype of a `tensor_type` string (ValueError if unknown or unsupported)."""
    if name not in _DTYPES:
        raise ValueError(f"MindSpore tensor_type {name!r} is not supported; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True, slots=True)
class CkptIndex:
    """Where everything in one `.ckpt` lies. `names` is the file order of tensors and `str` extras together."""

    path: Path
    names: tuple[str, ...]
    tensors: Mapping[str, TensorEntry]  # in file order
    extras: Mapping[str, str]  # `str` records (append_dict strings), in file order
    crc: int | None  # the stored trailer CRC, None without a trailer
    data_end: int  # bytes before the trailer (the file size without one)


class _Bad(Exception):
    """A malformed field; turned into a FormatError naming the file, record and parameter."""


def _varint(mm: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 70:
        b = mm[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    raise _Bad(f"a varint at byte {pos} runs past the end of its message")


def _fields(mm: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """Yield `(field, wire, value)`: value is the varint, or `(start, stop)` of a length-delimited field (the
    wire type says which, so callers check `wire` before using `value`)."""
    while pos < end:
        key, pos = _varint(mm, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(mm, pos, end)
        elif wire == 2:
            n, pos = _varint(mm, pos, end)
            if n > end - pos:
                raise _Bad(f"field {field} claims {n} bytes at byte {pos} but its message has {end - pos} left")
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
            if pos > end:
                raise _Bad(f"field {field} runs past the end of its message")
        else:
            raise _Bad(f"field {field} has wire type {wire}, which no checkpoint uses")
        yield field, wire, value


def _tensor_proto(mm: mmap.mmap, start: int, end: int) -> tuple[str, list[int], tuple[int, int]]:
    dims: list[int] = []
    type_span = content = None
    for field, wire, value in _fields(mm, start, end):
        if field == 1 and wire == 0:
            dims.append(value)
        elif field == 1 and wire == 2:  # packed dims: not what MindSpore writes, but valid protobuf
            pos, stop = value
            while pos < stop:
                d, pos = _varint(mm, pos, stop)
                dims.append(d)
        elif field == 2 and wire == 2:
            type_span = value
        elif field == 3 and wire == 2:
            content = value
    if type_span is None or content is None:
        raise _Bad("its TensorProto lacks tensor_type or tensor_content")
    if len(dims) > MAX_DIMS:
        raise _Bad(f"{len(dims)} dims, more than the {MAX_DIMS} any array can have")
    if any(d >= 1 << 63 for d in dims):
        raise _Bad(f"negative dims {[d - (1 << 64) if d >= 1 << 63 else d for d in dims]}")
    return mm[type_span[0] : type_span[1]].decode("ascii", "replace"), dims, content


def read_ckpt_index(path: Path, *, verify_crc: bool = False) -> CkptIndex:
    """Index a `.ckpt` without reading tensor bytes (the file is mmapped; only record headers are touched)."""
    path = Path(path)
    with open_regular(path, "the checkpoint") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise FormatError(f"{path}: the file is empty, not a MindSpore checkpoint (an interrupted save?)")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise FormatError(f"{path}: cannot map the checkpoint: {e.strerror}") from None
        with mm:
            return _index(path, mm, verify_crc)


def _crc32(path: Path, end: int) -> int:
    """CRC-32 of the file's first `end` bytes, read through its storage (an object store's file is read from the
    store: its local view holds only the record headers)."""
    reader = storage_for(path).open_read(path)
    try:
        crc, buf = 0, memoryview(bytearray(min(16 << 20, max(end, 1))))
        for offset in range(0, end, len(buf)):
            n = reader.readinto(offset, buf[: min(len(buf), end - offset)])
            crc = zlib.crc32(buf[:n], crc)
        return crc
    finally:
        reader.close()


def index_buffer(path: Path, buffer: Any) -> CkptIndex:
    """Index a `.ckpt` from any object that indexes and slices like its mmap (an object store's lazily fetched
    bytes: the indexer touches only record headers, so only they are fetched)."""
    return _index(path, buffer, False)


def _peek_tag(mm: mmap.mmap, pos: int, end: int) -> str | None:
    """The tag at the start of a record cut short, to name the parameter in the error."""
    try:
        key, pos = _varint(mm, pos, end)
        n, pos = _varint(mm, pos, end)
        return mm[pos : pos + n].decode("utf-8") if key == 0x0A and n <= end - pos else None
    except (_Bad, UnicodeDecodeError):
        return None


def _records(path: Path, mm: mmap.mmap, end: int):
    """Yield `(tag, tensor_type, dims, (content start, stop))` per record, checking every length."""
    pos = index = 0
    while pos < end:
        tag = None
        try:
            key, body = _varint(mm, pos, end)
            if key != 0x0A:
                raise _Bad(f"found protobuf key {key:#x} where a record (0x0a) must start")
            n, body = _varint(mm, body, end)
            if n > end - body:
                tag = _peek_tag(mm, body, end)
                raise _Bad(f"the record claims {n} bytes at byte {body} but the file has {end - body} left")
            kind = span = None
            for field, wire, value in _fields(mm, body, body + n):
                if field == 1 and wire == 2:
                    tag = mm[value[0] : value[1]].decode("utf-8")
                elif field in (2, 3) and wire == 2:
                    kind, span = field, value
            if tag is None or kind is None or span is None:  # kind and span are set together
                raise _Bad("the record has no tag" if tag is None else "the record holds no tensor")
            check_name(tag, f"{path}: record {index} at byte {pos}")
            if kind == 3:
                raise FormatError(
                    f"{path}: parameter {tag!r} is a MapTensor (MapParameter hash table), which is unsupported "
                    f"(MindSpore's transform_checkpoints cannot convert it either); remove it before converting"
                )
            yield (tag, *_tensor_proto(mm, *span))
        except (_Bad, UnicodeDecodeError) as e:
            where = f"record {index} at byte {pos}" + (f" (parameter {tag!r})" if tag is not None else "")
            if index == 0 and mm[0] != 0x0A:
                raise NotACheckpoint(f"{path}: not a MindSpore checkpoint, or an encrypted one ({where}: {e}); if it "
                                  f"was saved with enc_key, decrypt it with MindSpore first") from e
            raise FormatError(f"{path}: {where} is corrupt: {e}; the file is truncated or damaged") from e
        pos, index = body + n, index + 1


def _index(path: Path, mm: mmap.mmap, verify_crc: bool) -> CkptIndex:
    size = end = len(mm)
    if size >= 4 and int.from_bytes(mm[:4], "little") in ENCRYPTED_MAGICS:
        raise FormatError(f"{path}: the checkpoint is encrypted (saved with enc_key); decrypt it with MindSpore first: "
                          f"load_checkpoint(file, dec_key=..., dec_mode=...), then save_checkpoint without a key")
    crc = None
    if size >= 17 and mm[size - 17 : size - 10] == CRC_MARKER:
        end, crc = size - 17, int.from_bytes(mm[size - 10 :], "big")
        if verify_crc:
            actual = _crc32(path, end)
            if actual != crc:
                raise FormatError(f"{path}: CRC mismatch: the trailer says {crc:#010x}, the contents hash to "
                                  f"{actual:#010x}; the file is corrupt, copy it again from its source")
    order: dict[str, None] = {}
    tensors: dict[str, TensorEntry] = {}
    extras: dict[str, str] = {}
    for tag, group in itertools.groupby(_records(path, mm, end), key=lambda r: r[0]):
        group = list(group)
        order.setdefault(tag)
        _, type_name, dims, content = group[-1]
        if type_name == "str":  # a repeated str record simply replaces the previous one, as in MindSpore
            try:
                extras[tag] = mm[content[0] : content[1]].decode("utf-32-le").rstrip("\0")
            except UnicodeDecodeError as e:
                raise FormatError(f"{path}: str entry {tag!r} is not UTF-32LE text ({e}); the file is corrupt") from e
            tensors.pop(tag, None)
            continue
        if type_name not in _DTYPES:
            what = _UNSUPPORTED.get(type_name, "an unknown tensor_type")
            raise FormatError(f"{path}: parameter {tag!r} has tensor_type {type_name!r} ({what}), which is "
                              f"unsupported; cast it to one of {', '.join(_DTYPES)} with MindSpore first")
        if any((t, d) != (type_name, dims) for _, t, d, _ in group):
            raise FormatError(f"{path}: parameter {tag!r} is split into records that disagree on tensor_type/dims "
                              f"{sorted({(t, str(d)) for _, t, d, _ in group})}; the file is corrupt")
        shape, dtype = (() if dims == [0] else tuple(dims)), _DTYPES[type_name]
        segments = tuple((a, b - a) for _, _, _, (a, b) in group)
        have, need = sum(n for _, n in segments), math.prod(shape) * dtype.itemsize
        if have != need:
            raise FormatError(f"{path}: parameter {tag!r} holds {have} bytes but its dims {dims} and type "
                              f"{type_name} need {need}; the file is corrupt or was not written by MindSpore")
        extras.pop(tag, None)
        tensors[tag] = TensorEntry(tag, dtype, shape, path, segments)
    names = tuple(order)
    return CkptIndex(path, names, MappingProxyType({n: tensors[n] for n in names if n in tensors}),
                     MappingProxyType({n: extras[n] for n in names if n in extras}), crc, end)

