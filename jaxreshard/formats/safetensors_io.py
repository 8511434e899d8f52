"""safetensors: size-checked header parsing (one file, or a Hugging Face index folder), and the format's public
names: the writer lives in safetensors_write.py and the dtype codes in safetensors_dtypes.py, both re-exported
here.

Reading parses only the 8-byte length and the JSON header (what `safe_open` does), validated against the
file size before anything is allocated; tensor bytes are then read by `base.read_box` with `preadv`, which
was 2x faster than `safe_open(...).get_slice` for row blocks and reads only the requested columns' rows
instead of the whole tensor.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TypeGuard

from ..errors import FormatError
from .base import TensorEntry
from .safetensors_dtypes import DTYPE_CODES as DTYPE_CODES
from .safetensors_dtypes import DTYPES as DTYPES
from .safetensors_dtypes import FP8_CODES as FP8_CODES
from .safetensors_dtypes import FP8_DTYPES as FP8_DTYPES
from .safetensors_dtypes import PACKED_CODES
from .safetensors_write import SafetensorsWriter as SafetensorsWriter
from .safetensors_write import header_bytes as header_bytes
from .safetensors_write import split_into_files as split_into_files
from .untrusted import MAX_DIMS, check_name, check_text, list_dir, load_json, open_regular

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit; bigger is corrupt, not a checkpoint
HF_INDEX = "model.safetensors.index.json"
MAX_INDEX_BYTES = 100_000_000  # a Hugging Face index lists names and file names: megabytes, never more
MAX_ELEMENTS = 1 << 63  # more elements than any file (or int64 offset) can hold: the shape is corrupt


def read_safetensors_index(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """Tensor entries (in data-offset order) and `__metadata__` of one safetensors file.

    The header is held to what the safetensors library itself accepts: its tensors tile the data area exactly
    (no overlap, no gap, nothing after the last one), `__metadata__` maps strings to strings; jaxreshard is
    stricter only where a file could not be handled safely (more than 64 dims, empty or NUL names).
    """
    path = Path(path)
    try:
        with open_regular(path, "the safetensors file") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: not a safetensors file: {file_size} bytes, shorter than its 8-byte header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise FormatError(
                    f"{path}: corrupt or truncated safetensors file: header claims {header_len} bytes but the file "
                    f"has {file_size}; re-copy or re-save it"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    header = load_json(raw, path, "safetensors header", _no_duplicates(path))
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header: not a JSON object")
    metadata = _metadata(path, header.pop("__metadata__", None))
    data_start = 8 + header_len
    data_bytes = file_size - data_start
    entries = [_parse_entry(path, param, info, data_start, data_bytes) for param, info in header.items()]
    entries.sort(key=lambda e: e.segments[0][0])
    _check_tiling(path, entries, data_start, data_bytes)
    return entries, metadata


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    """`__metadata__`: absent or null is empty, else an object of strings (as the safetensors library demands)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: corrupt safetensors header: __metadata__ must be an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise FormatError(f"{path}: corrupt safetensors header: __metadata__ {key!r} is {type(value).__name__} "
                              f"{_short(value)}, not a string (the safetensors library refuses it too)")
        check_text(key, str(path), "__metadata__ key")
        check_text(value, str(path), f"__metadata__ {key!r} value")
    return dict(metadata)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_tiling(path: Path, entries: Sequence[TensorEntry], data_start: int, data_bytes: int) -> None:
    """Sorted by (begin, end), tensors must be contiguous from 0 to the end of the file, as the library checks:
    an overlap means two tensors share bytes, a gap or trailing bytes belong to no tensor; either way the file
    was not written by a safetensors writer and cannot be trusted."""
    expected, previous = 0, None
    for entry in sorted(entries, key=lambda e: (e.segments[0][0], e.segments[0][1])):
        begin = entry.segments[0][0] - data_start
        offsets = [begin, begin + entry.segments[0][1]]
        if begin != expected:
            after = f"the end of {previous!r}" if previous is not None else "the start of the data"
            kind = (f"a gap of {begin - expected} bytes" if begin > expected
                    else f"an overlap of {expected - begin} bytes")
            raise FormatError(f"{path}: parameter {entry.param!r}: data_offsets {offsets} leave {kind} after {after} "
                              f"(byte {expected}); tensors must tile the data exactly, the file is corrupt")
        expected, previous = offsets[1], entry.param
    if expected != data_bytes:
        after = f"after the last tensor {previous!r}" if previous is not None else "in a file with no tensors"
        raise FormatError(f"{path}: {data_bytes - expected} bytes {after} belong to no tensor (data ends at byte "
                          f"{data_start + expected}, the file has {data_start + data_bytes}); the file is corrupt or "
                          "was appended to, re-copy or re-save it")


def _no_duplicates(path: Path):
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise FormatError(f"{path}: key {key!r} appears twice in one JSON object (a duplicate parameter or "
                                  "field); the file is corrupt")
            out[key] = value
        return out

    return hook


def _int_list(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _parse_entry(path: Path, param: str, info: object, data_start: int, data_bytes: int) -> TensorEntry:
    check_name(param, path)
    where = f"{path}: parameter {param!r}"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: header entry is not an object")
    code = info.get("dtype")
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None and code in PACKED_CODES:
        raise FormatError(f"{where}: dtype {code} packs several values per byte, which jaxreshard cannot cut into "
                          "blocks; convert it with the safetensors library or store it unpacked (U8)")
    if dtype is None:
        raise FormatError(f"{where}: unsupported dtype {_short(code)}; supported: {sorted(DTYPES)}")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not (_int_list(shape) and all(0 <= s < MAX_ELEMENTS for s in shape)):
        raise FormatError(f"{where}: bad shape {_short(shape)}")
    if len(shape) > MAX_DIMS:
        raise FormatError(f"{where}: shape has {len(shape)} dimensions, more than the {MAX_DIMS} any array can have")
    if not (_int_list(offsets) and len(offsets) == 2):
        raise FormatError(f"{where}: bad data_offsets {_short(offsets)}")
    elements = 1
    for s in shape:
        elements *= s
        if elements >= MAX_ELEMENTS:
            raise FormatError(f"{where}: shape {_short(shape)} has an absurd element count (2^63 or more); corrupt")
    begin, end = offsets
    nbytes = elements * dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise FormatError(f"{where}: data_offsets {offsets} do not hold {nbytes} bytes for shape {shape}")
    if end > data_bytes:
        raise FormatError(
            f"{where}: data ends at byte {data_start + end} but the file has {data_start + data_bytes}; "
            "the file is truncated, re-copy it"
        )
    return TensorEntry(param, dtype, tuple(shape), path, ((data_start + begin, nbytes),))


def read_hf_index(dir_path: Path) -> list[TensorEntry]:
    """Entries of a Hugging Face sharded directory (`model.safetensors.index.json` + its part files).

    The index and the parts must agree exactly: a tensor in a part but not in `weight_map` would silently
    vanish from the output, so it is an error, like an entry whose tensor is missing. Entries name files of this
    folder only (paths stay inside the source)."""
    folder = Path(dir_path)
    index_path = folder / HF_INDEX
    weight_map = _weight_map(index_path)
    files = list(dict.fromkeys(weight_map.values()))
    parts = {name: _part_path(folder, index_path, name) for name in files}
    _check_all_parts_listed(folder, index_path, files)
    entries: dict[str, TensorEntry] = {}
    seen: dict[str, Path] = {}
    for name in files:
        for entry in read_safetensors_index(parts[name])[0]:
            if entry.param in seen:
                raise FormatError(
                    f"{entry.path}: parameter {entry.param!r} is also in {seen[entry.param]}; "
                    "duplicate parameter names"
                )
            seen[entry.param] = entry.path
            if entry.param not in weight_map:
                raise FormatError(f"{index_path}: parameter {entry.param!r} of {name} is missing from weight_map, so "
                                  "it would be dropped; add it to the index or remove it from the part file")
            if weight_map[entry.param] == name:
                entries[entry.param] = entry
    missing = [p for p in weight_map if p not in entries]
    if missing:
        raise FormatError(f"{index_path}: parameters listed but absent from their files: {missing[:10]}")
    return [entries[p] for p in weight_map]


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's `weight_map`, size-capped and strictly parsed (one-line errors for every malformation)."""
    try:
        with open_regular(index_path, "the Hugging Face index") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_INDEX_BYTES:
                raise FormatError(f"{index_path}: the index is {size} bytes, over the {MAX_INDEX_BYTES}-byte limit; "
                                  "an index lists names only, so this one is not a Hugging Face index")
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise FormatError(f"{index_path}: cannot read: {e.strerror}") from None
    index = load_json(raw, index_path, "Hugging Face index", _no_duplicates(index_path))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index_path}: unreadable index: it needs a 'weight_map' object mapping parameter names "
                          "to file names")
    if not weight_map:
        raise FormatError(f"{index_path}: 'weight_map' is empty, so the checkpoint would be empty; an index must list "
                          "every tensor of its part files")
    return weight_map


_PART_NAME = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.safetensors")  # huggingface_hub's part file names


def _check_all_parts_listed(folder: Path, index_path: Path, files: Sequence[str]) -> None:
    """A `<prefix>-0000k-of-0000n.safetensors` file next to listed parts of the same series but absent from the
    index is a whole part whose tensors would vanish; other files (a `consolidated.safetensors`) are not parts."""
    series = {m.group(1, 3) for name in files if (m := _PART_NAME.fullmatch(name))}
    if not series:
        return
    listed = set(files)
    for child in list_dir(folder):
        m = _PART_NAME.fullmatch(child.name)
        if m and m.group(1, 3) in series and child.name not in listed:
            raise FormatError(f"{index_path}: part file {child.name} is not in weight_map, so its tensors would be "
                              "dropped; list them in the index or remove the file")


def _part_path(folder: Path, index_path: Path, name: str) -> Path:
    """`folder / name`, refused unless `name` is a plain file name resolving inside the folder (a link into the
    Hugging Face cache's own `blobs/` folder, next to `snapshots/`, counts as inside)."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or os.path.isabs(name):
        raise FormatError(f"{index_path}: weight_map names {name!r}, not a plain file name in {folder}; paths stay "
                          "inside the source")
    path = folder / name
    root, target = folder.resolve(), path.resolve()
    cache_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if not (target.is_relative_to(root) or (cache_blobs is not None and target.is_relative_to(cache_blobs))):
        raise FormatError(f"{index_path}: weight_map file {name!r} is a link to {target}, outside {folder}; paths "
                          "stay inside the source")
    return path
