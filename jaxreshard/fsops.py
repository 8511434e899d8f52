"""Small file-system operations of the output commit, each failing with one line: folders made, trees fsynced,
OS write failures named (full, read-only, denied); and the fault points the tests use to kill a run mid-write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

FAULT_ENV = "JAXRESHARD_FAULT"  # tests only: "<point>[@<n>][:<SIGNAL>]" kills this process at a named point
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_failure(e: OSError, file: str | Path) -> OutputError:
    """The one-line error for an OS failure while writing `file` under the destination, with what to do."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free space (or quota) or choose another destination"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "make the destination writable or choose another one"
    else:
        hint = "check the destination's file system"
    return OutputError(f"writing {file} failed: {e.strerror or e}; {hint}")


@contextlib.contextmanager
def writes_named(dst: Path) -> Iterator[None]:
    """Destination failures (full, read-only, denied) that escape a writer are named as writes, not tracebacks."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_failure(e, e.filename or dst) from None


def make_parent(target: Path) -> None:
    """Create the folder `target` will be written in (a one-line OutputError if that fails)."""
    make_dir(target.parent)


def make_dir(path: Path) -> None:
    """`mkdir -p` with a one-line OutputError naming the blocking file or the OS reason."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise OutputError(f"cannot create {path}: {blocker} is a file, not a folder; choose another "
                          "destination") from None
    except OSError as e:
        raise OutputError(f"cannot create {path}: {e.strerror}; choose a writable destination") from None


def fsync_tree(root: Path) -> None:
    """Make the folders of a finished tree durable before it is committed (file writers sync their files)."""
    for dirpath, _, _ in os.walk(root):
        try:
            fsync_dir(Path(dirpath))
        except OSError as e:
            raise OutputError(f"syncing {dirpath} to disk failed: {e.strerror}") from None


def fsync_dir(path: Path) -> None:
    """fsync a folder, so the names created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FAULT_COUNTS: dict[str, int] = {}


def fault(point: str) -> None:
    """Fault injection for tests: with JAXRESHARD_FAULT=<point>[@<n>][:<SIGNAL>] the process sends itself
    SIGNAL (default KILL) the n-th time (default first) it reaches `point`. Unset, this does nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    m = re.fullmatch(r"([\w-]+)(?:@(\d+))?(?::(\w+))?", spec)
    if m is None or m.group(1) != point:
        return
    _FAULT_COUNTS[point] = _FAULT_COUNTS.get(point, 0) + 1
    if _FAULT_COUNTS[point] == int(m.group(2) or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{m.group(3) or 'KILL'}"))
