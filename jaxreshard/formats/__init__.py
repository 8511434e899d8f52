"""Finding a checkpoint on disk and indexing it, whatever its format (headers only, never tensor bytes).

Accepted sources:
- a single checkpoint file (complete);
- a Hugging Face sharded directory with `model.safetensors.index.json` (complete);
- a directory with one checkpoint file and no `rank_*` folders (complete);
- a distributed directory of `rank_<n>/` folders; in each, the lexicographically last checkpoint file is used
  (MindSpore's rule) and the candidates are logged. A single `rank_0/` is a complete checkpoint.

Untrusted sources are held to: canonical rank folder names (`rank_<n>`, ASCII digits, no leading zeros, so no two
folders alias one rank), regular files only (a FIFO or device is refused at once, never opened to block), and
Hugging Face index entries that stay inside the folder and match the part files exactly.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import FormatError
from .base import TensorEntry
from .mindspore_ckpt import read_ckpt_index
from .safetensors_io import HF_INDEX, read_hf_index, read_safetensors_index
from .untrusted import NotACheckpoint, file_kind, list_dir, stat_source

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
    folder: Path | None = None  # the folder named as the source when `path` is its one checkpoint file

    @property
    def root(self) -> Path:
        """The folder whose non-weight files (config.json, tokenizer) belong to this checkpoint."""
        return self.folder if self.folder is not None else Path(self.path)

    @property
    def ranks(self) -> list[int]:
        return sorted(self.entries)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape as stored (one rank's block in a distributed source: its tensor rank, not
        its full shape)."""
        return {p: e.shape for entries in self.entries.values() for p, e in entries.items()}


RANK_DIR = re.compile(r"rank_(0|[1-9][0-9]*)", re.ASCII)  # canonical: ASCII digits, no leading zeros
_RANK_LIKE = re.compile(r"rank_\d+")  # what could be read as a rank (`\d` also matches non-ASCII digits)


def rank_dirs(path: Path) -> dict[int, Path]:
    """The `rank_<n>/` folders of a source, by rank. A folder that looks like one but is not canonical
    (`rank_00`, `rank_٣`) is an error: it would alias another rank, and which one won would depend on the
    order the folder is listed in."""
    out, odd = {}, []
    for child in list_dir(path):
        if RANK_DIR.fullmatch(child.name):
            if child.is_dir():
                out[int(child.name[5:])] = child
        elif _RANK_LIKE.fullmatch(child.name) and child.is_dir():
            odd.append(child.name)
    if odd:
        raise FormatError(f"{path}: rank folder(s) {odd[:5]} are not named rank_<n> with ASCII digits and no leading "
                          "zeros; rename them (rank_00 -> rank_0) so no two folders can name one rank")
    return out


def _checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoint files of a folder, by name. Sub-folders are skipped; any other non-regular entry with a
    checkpoint suffix (a FIFO, a device, a dangling link) is an error, never silently passed over."""
    out = []
    for child in list_dir(folder):
        if child.suffix not in READERS:
            continue
        mode = stat_source(child, "checkpoint file").st_mode
        if stat.S_ISREG(mode):
            out.append(child)
        elif not stat.S_ISDIR(mode):
            raise FormatError(f"{child}: is {file_kind(mode)}; only regular files are read as checkpoints")
    return out


def _pick_file(rank_dir: Path) -> Path:
    candidates = _checkpoint_files(rank_dir)
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
    mode = stat_source(path).st_mode
    if stat.S_ISREG(mode):
        if path.suffix not in READERS:
            raise NotACheckpoint(f"{path}: unknown checkpoint format {path.suffix!r}; supported: {sorted(READERS)}")
        return _source(path, path.suffix, False, {0: path})
    if not stat.S_ISDIR(mode):
        raise FormatError(f"{path}: the source is {file_kind(mode)}; give a checkpoint file (a regular file) or folder")
    if os.path.lexists(path / HF_INDEX):
        entries = read_hf_index(path)
        files = tuple(dict.fromkeys(e.path for e in entries))
        order = tuple(e.param for e in entries)
        return SourceCheckpoint(path, ".safetensors", False, {0: files}, {0: {e.param: e for e in entries}},
                                {0: {}}, {0: order}, {0: {}})
    ranks = rank_dirs(path)
    if not ranks:
        files = _checkpoint_files(path)
        if len(files) != 1:
            raise NotACheckpoint(
                f"{path}: expected rank_<n>/ folders, a {HF_INDEX}, or exactly one checkpoint file; found "
                f"{[p.name for p in files] or 'nothing'}"
            )
        # the folder is remembered: its companion files travel with it, an output inside it is refused
        return replace(open_source(files[0]), folder=path)
    picked = {rank: _pick_file(d) for rank, d in sorted(ranks.items())}
    suffixes = {p.suffix for p in picked.values()}
    if len(suffixes) > 1:
        raise FormatError(f"{path}: rank folders mix formats {sorted(suffixes)}; convert them separately")
    distributed = len(picked) > 1 or 0 not in picked
    return _source(path, suffixes.pop(), distributed, picked)
