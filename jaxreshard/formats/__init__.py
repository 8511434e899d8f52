"""Finding a checkpoint on disk and indexing it, whatever its format (headers only, never tensor bytes).

Accepted sources:
- a single checkpoint file (complete);
- a Hugging Face sharded directory with `model.safetensors.index.json` (complete);
- a directory with one checkpoint file and no `rank_*` folders (complete);
- a distributed directory of `rank_<n>/` folders; in each, the lexicographically last checkpoint file is used
  (MindSpore's rule) and the candidates are logged. A single `rank_0/` is a complete checkpoint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError
from .base import TensorEntry
from .mindspore_ckpt import read_ckpt_index
from .safetensors_io import HF_INDEX, read_hf_index, read_safetensors_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileIndex:
    """What a format reader finds in one file: tensors in file order, text entries, file metadata."""

    entries: list[TensorEntry]
    extras: dict[str, str] = field(default_factory=dict)  # MindSpore `str` records (append_dict strings)
    order: tuple[str, ...] = ()  # every name in file order, extras included
    metadata: dict[str, str] = field(default_factory=dict)


def _safetensors_index(path: Path) -> FileIndex:
    entries, metadata = read_safetensors_index(path)
    return FileIndex(entries, {}, tuple(e.param for e in entries), metadata)


def _ckpt_index(path: Path) -> FileIndex:
    index = read_ckpt_index(path)
    return FileIndex(list(index.tensors.values()), dict(index.extras), index.names)


READERS: dict[str, Callable[[Path], FileIndex]] = {".safetensors": _safetensors_index, ".ckpt": _ckpt_index}


@dataclass(frozen=True)
class SourceCheckpoint:
    """An indexed source: per global source rank, its file and its tensors in file order."""

    path: Path
    suffix: str
    distributed: bool
    files: dict[int, tuple[Path, ...]]
    entries: dict[int, dict[str, TensorEntry]] = field(repr=False)
    extras: dict[int, dict[str, str]] = field(default_factory=dict, repr=False)  # per rank, MindSpore str entries
    orders: dict[int, tuple[str, ...]] = field(default_factory=dict, repr=False)  # per rank, names incl. extras
    metadata: dict[int, dict[str, str]] = field(default_factory=dict, repr=False)

    @property
    def ranks(self) -> list[int]:
        return sorted(self.entries)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape as stored (one rank's block in a distributed source: its tensor rank, not
        its full shape)."""
        return {p: e.shape for entries in self.entries.values() for p, e in entries.items()}


def _rank_dirs(path: Path) -> dict[int, Path]:
    out = {}
    for child in path.iterdir():
        m = re.fullmatch(r"rank_(\d+)", child.name)
        if m and child.is_dir():
            out[int(m.group(1))] = child
    return out


def _pick_file(rank_dir: Path) -> Path:
    candidates = sorted(p for p in rank_dir.iterdir() if p.suffix in READERS and p.is_file())
    if not candidates:
        raise FormatError(f"{rank_dir}: no checkpoint file ({', '.join('*' + s for s in READERS)}) in this rank folder")
    if len({p.suffix for p in candidates}) > 1:
        raise FormatError(f"{rank_dir}: mixes checkpoint formats {[p.name for p in candidates]}; keep one")
    if len(candidates) > 1:
        log.info("%s: %d candidates %s; using the lexicographically last, %s", rank_dir, len(candidates),
                 [p.name for p in candidates], candidates[-1].name)
    return candidates[-1]


def _index(path: Path) -> FileIndex:
    index = READERS[path.suffix](path)
    seen: set[str] = set()
    for entry in index.entries:
        if entry.param in seen:
            raise FormatError(f"{path}: parameter {entry.param!r} appears twice; the file is corrupt")
        seen.add(entry.param)
    return index


def _source(path: Path, suffix: str, distributed: bool, files: dict[int, Path]) -> SourceCheckpoint:
    indexes = {rank: _index(p) for rank, p in files.items()}
    return SourceCheckpoint(
        path, suffix, distributed, {r: (p,) for r, p in files.items()},
        {r: {e.param: e for e in i.entries} for r, i in indexes.items()},
        {r: i.extras for r, i in indexes.items()},
        {r: i.order for r, i in indexes.items()},
        {r: i.metadata for r, i in indexes.items()},
    )  # fmt: skip


def source_from_files(path: Path, files: dict[int, Path]) -> SourceCheckpoint:
    """A distributed source whose rank files were chosen by the caller (e.g. by file suffix)."""
    if not files:
        raise FormatError(f"{path}: no rank_<n> folders")
    suffixes = {p.suffix for p in files.values()}
    if len(suffixes) > 1:
        raise FormatError(f"{path}: rank files mix formats {sorted(suffixes)}")
    return _source(Path(path), suffixes.pop(), len(files) > 1 or 0 not in files, dict(sorted(files.items())))


def open_source(path: str | Path) -> SourceCheckpoint:
    """Index a source checkpoint (see the module docstring for the accepted shapes)."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: source checkpoint does not exist")
    if path.is_file():
        if path.suffix not in READERS:
            raise FormatError(f"{path}: unknown checkpoint format {path.suffix!r}; supported: {sorted(READERS)}")
        return _source(path, path.suffix, False, {0: path})
    if (path / HF_INDEX).is_file():
        entries = read_hf_index(path)
        files = tuple(dict.fromkeys(e.path for e in entries))
        order = tuple(e.param for e in entries)
        return SourceCheckpoint(path, ".safetensors", False, {0: files}, {0: {e.param: e for e in entries}},
                                {0: {}}, {0: order}, {0: {}})
    rank_dirs = _rank_dirs(path)
    if not rank_dirs:
        files = sorted(p for p in path.iterdir() if p.suffix in READERS and p.is_file())
        if len(files) != 1:
            raise FormatError(
                f"{path}: expected rank_<n>/ folders, a {HF_INDEX}, or exactly one checkpoint file; found "
                f"{[p.name for p in files] or 'nothing'}"
            )
        return open_source(files[0])
    picked = {rank: _pick_file(d) for rank, d in sorted(rank_dirs.items())}
    suffixes = {p.suffix for p in picked.values()}
    if len(suffixes) > 1:
        raise FormatError(f"{path}: rank folders mix formats {sorted(suffixes)}; convert them separately")
    distributed = len(picked) > 1 or 0 not in picked
    return _source(path, suffixes.pop(), distributed, picked)
