"""One writer per destination: POSIX byte-range locks on a sibling lock file `.<dst-name>.lock`.

A run writing the whole destination locks the whole file; a `--ranks` run locks one byte per destination rank
it writes (byte `1 + rank`), so disjoint `--ranks` runs on one destination (the nodes of a multi-node job on a
shared disk) coexist while overlapping ones, or a whole run and a ranks run, conflict. The kernel releases the
locks when the process dies, however it dies, so a lock is never stale. Locking never blocks: a second run
fails at once naming the holder's pid. The last holder removes the (empty) lock file, after taking the whole
of it, so no other process holds any part; a run that opened the file just before checks, once it holds its
lock, that the file is still the one at that path, and starts again if not. A killed run leaves the file
behind (harmless: an unlocked lock file).

POSIX locks belong to the process, not to the file descriptor, so within one process (threads, library use)
the ranges held are also kept in a table: a second overlapping lock from the same process conflicts too, and
one descriptor per lock file is shared (closing any descriptor of the file would drop all of the process's
locks on it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OutputError

WHOLE = (0, 0)  # (start, length); length 0 = to the end of the file and beyond


@dataclass
class _LockFile:
    fd: int
    ranges: list[tuple[int, int]] = field(default_factory=list)


_HELD: dict[tuple[int, int], _LockFile] = {}  # (st_dev, st_ino) -> this process's locks on that file
_GUARD = threading.Lock()


def lock_path(dst: Path) -> Path:
    """The lock file of a destination (already resolved): its sibling `.<name>.lock`."""
    return dst.parent / f".{dst.name}.lock"


@contextlib.contextmanager
def destination_lock(dst: Path, ranks: Sequence[int] | None = None) -> Iterator[Path]:
    """Hold the lock of `dst` (the whole destination, or only byte `1 + r` for each rank in `ranks`) for the
    duration of the block; raise `OutputError` at once, naming the holder, if another writer holds any of it.

    `dst` must be the resolved destination (`fsutil.resolve_destination`): two spellings of one destination
    (a symlink and its target) must share one lock file. Yields the lock file's path.
    """
    path = lock_path(dst)
    ranges: list[tuple[int, int]] = [WHOLE] if ranks is None else _byte_ranges(ranks)
    with _GUARD:
        entry = _acquire(path, dst, ranges, ranks)
    try:
        yield path
    finally:
        with _GUARD:
            _release(path, entry, ranges)


def _byte_ranges(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Bytes `1 + r` of the ranks as few (start, length) ranges (ranks 0-1023: one range, one system call)."""
    out: list[tuple[int, int]] = []
    for r in sorted(set(ranks)):
        if out and out[-1][0] + out[-1][1] == 1 + r:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((1 + r, 1))
    return out


def _acquire(path: Path, dst: Path, ranges: list[tuple[int, int]], ranks: Sequence[int] | None) -> _LockFile:
    for _ in range(10):  # retried only when the lock file was replaced between opening and locking it
        key, entry = _open(path)
        clash = next((r for r in ranges for h in entry.ranges if _overlap(r, h)), None)
        if clash is not None:
            raise OutputError(_busy(dst, path, os.getpid(), ranks))
        locked: list[tuple[int, int]] = []
        try:
            for start, length in ranges:
                fcntl.lockf(entry.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
                locked.append((start, length))
        except OSError as e:
            _unlock(entry, locked)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise OutputError(f"{path}: cannot lock the destination's lock file: {e.strerror}") from None
            holder = _holder(entry.fd, ranges[len(locked)])
            _forget_if_unused(key, entry)
            raise OutputError(_busy(dst, path, holder, ranks)) from None
        if _same_file(path, entry.fd):
            entry.ranges.extend(ranges)
            return entry
        _unlock(entry, locked)  # someone removed or replaced the lock file: lock the one now in place
        _forget_if_unused(key, entry)
    raise OutputError(f"{path}: the lock file keeps being replaced; is another program removing it?")


def _open(path: Path) -> tuple[tuple[int, int], _LockFile]:
    """This process's entry for the lock file at `path`, opening (and creating) the file if needed."""
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in _HELD:
            return key, _HELD[key]
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise OutputError(f"cannot create the lock file {path}: {e.strerror}; make {path.parent} writable or "
                          "choose another destination") from None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if key in _HELD:  # created meanwhile by another thread of this process: share its descriptor
        os.close(fd)  # safe: this process holds no lock through a descriptor it has not yet registered
        return key, _HELD[key]
    _HELD[key] = _LockFile(fd)
    return key, _HELD[key]


def _release(path: Path, entry: _LockFile, ranges: list[tuple[int, int]]) -> None:
    """Give back `ranges`; the last holder anywhere removes the lock file (see the module docstring)."""
    for r in ranges:
        entry.ranges.remove(r)
    if not entry.ranges:
        try:  # succeeds only if no other process holds any part of the file
            fcntl.lockf(entry.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
        except OSError:
            pass
        else:
            if _same_file(path, entry.fd):
                with contextlib.suppress(OSError):
                    os.unlink(path)  # a run that opened it meanwhile sees the unlink after locking and retries
    _unlock(entry, ranges)
    key = next((k for k, v in _HELD.items() if v is entry), None)
    if key is not None:
        _forget_if_unused(key, entry)


def _forget_if_unused(key: tuple[int, int], entry: _LockFile) -> None:
    if not entry.ranges and _HELD.get(key) is entry:
        del _HELD[key]
        os.close(entry.fd)


def _unlock(entry: _LockFile, ranges: list[tuple[int, int]]) -> None:
    for start, length in ranges:
        with contextlib.suppress(OSError):
            fcntl.lockf(entry.fd, fcntl.LOCK_UN, length, start)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    a_end = a[0] + a[1] if a[1] else None
    b_end = b[0] + b[1] if b[1] else None
    return (b_end is None or a[0] < b_end) and (a_end is None or b[0] < a_end)


def _same_file(path: Path, fd: int) -> bool:
    try:
        st, mine = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(fd: int, wanted: tuple[int, int]) -> int | None:
    """The pid holding a lock that conflicts with `wanted` (F_GETLK), where the platform's struct is known."""
    if not sys.platform.startswith("linux"):
        return None
    fmt = "hhqqi4x"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid
    query = struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, wanted[0], wanted[1], 0)
    try:
        l_type, _, _, _, pid = struct.unpack(fmt, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


def _busy(dst: Path, path: Path, holder: int | None, ranks: Sequence[int] | None) -> str:
    who = f"process {holder}" if holder else "another process"
    what = "this destination" if ranks is None else "this destination (or some of the ranks requested)"
    return (f"{dst}: {who} is writing {what} (it holds {path}); wait for it to finish or choose another "
            "destination")
