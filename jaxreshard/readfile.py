"""Reading a small input file (job, layout, strategy) whole: only a regular file, only up to a cap.

`open()` on a FIFO blocks until a writer appears and a device such as /dev/zero never ends, so the file is
opened non-blocking and checked with `fstat` before a byte is read; the size is capped before reading so a
wrong path (a checkpoint given as a layout) fails at once instead of filling memory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import JaxreshardError


def read_regular_file(path: Path, limit: int, error: type[JaxreshardError], what: str) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes (never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: {what} is not a regular file (a directory, FIFO or device); give a file")
        if info.st_size > limit:
            raise error(f"{path}: {what} is {info.st_size} bytes, over the cap of {limit}; is it the right file?")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{path}: {what} grew past the cap of {limit} bytes while being read")
    return data


def one_line(text: object) -> str:
    """Collapse whitespace (PyYAML and JSON messages span several lines) so an error stays one line."""
    return " ".join(str(text).split())
