"""Crash-safe output: write into a temporary sibling directory, fsync, rename into place.

An interrupted run therefore never leaves a directory that looks finished, an existing destination is never
touched without `overwrite`, and on failure only our own `.<name>.partial-<pid>` directory is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import ConfigError, OutputExistsError


def check_destination(dst: Path, sources: Sequence[Path], *, overwrite: bool) -> None:
    """Refuse a destination that exists (unless `overwrite`) or that overlaps a source."""
    dst = Path(dst).absolute()
    for src in sources:
        src = Path(src).resolve()
        real_dst = dst.resolve()
        if real_dst == src or src in real_dst.parents or real_dst in src.parents:
            raise ConfigError(f"{dst}: the destination overlaps the source {src}; choose another destination")
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        if not overwrite:
            raise OutputExistsError(f"{dst}: already exists and is not empty; pass --overwrite to replace it")
        if not dst.is_dir():
            raise OutputExistsError(f"{dst}: exists and is not a directory; remove it or choose another destination")


@contextlib.contextmanager
def atomic_output(dst: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `dst`, on error it is removed."""
    dst = Path(dst).absolute()
    check_destination(dst, [], overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(dst)
    try:
        yield tmp
        fsync_tree(tmp)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            old.rmdir()
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)  # replaced only after the new output is complete, as --overwrite asked
        else:
            os.rename(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def partial_dir(dst: Path) -> Path:
    """A fresh, uniquely named temporary sibling `.<name>.partial-<random>` of `dst` (unique per process and
    thread, so concurrent writers of one destination never share it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))


def fsync_tree(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
