"""Where checkpoint bytes live: the one seam between the formats and the medium (local files today).

Every format reads and writes byte ranges only through this module, so a new medium (an object store, issue
12) is one new module implementing `Storage` plus one `register(scheme, storage)` call; no format changes.
Locations without a registered scheme (every path today) are local files, served by `LocalStorage` with the
same system calls the formats made before this seam existed (`preadv` into the caller's buffer, `O_EXCL`
create, `ftruncate`, `pwritev` loops, `fsync`), so behaviour and speed are unchanged.

Concurrency (the local I/O engine, issue 12): `readinto` of one reader is called from several threads of the read
pool at once (locally `preadv`, which keeps no file position); a reader may set two optional attributes the
engine reads with a default: `coalesce_gap` (bytes; wanted runs this close are read as one range, default 0)
and `read_chunk` (the most one request reads, default 8 MiB). A `ByteWriter` is called from one thread at a
time, in the order the caller wrote (rank writers queue their writes behind, `writebehind.py`).

Call sequence (the contract a `Storage` keeps, as torch DCP's `StorageWriter` spells its own):
  reading:  `open_read(loc)` -> `size()`, `readinto(offset, buffer)` any number of times, in any order, also
            `prefetch(offset, nbytes)` hints -> `close()`.
  writing:  `create(loc, size)` (a NEW object of exactly `size` bytes; an existing one is refused with
            `FileExistsError`) or `reopen(loc)` (continue one a killed run left, for `--resume`) ->
            `write_at(offset, buffers)` any number of times, in any order, each range inside `size` ->
            `sync()` whenever the caller journals progress -> exactly one of `close()` (durable and complete:
            only now may readers rely on the bytes) or `abort()` (release; a created object is removed, so no
            complete-looking file is left behind).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

Location = str | Path
Buffer = bytes | bytearray | memoryview


class ByteReader(Protocol):
    """Random-access reads of one stored object."""

    def size(self) -> int: ...

    def readinto(self, offset: int, buffer: memoryview) -> int:
        """Fill `buffer` from `offset`; returns the bytes read, fewer than `len(buffer)` only where the object ends."""
        ...

    def prefetch(self, offset: int, nbytes: int) -> None:
        """A hint that these bytes will be read soon; may do nothing, never fails."""
        ...

    def close(self) -> None: ...


class ByteWriter(Protocol):
    """Positional writes into one new object of a size fixed at creation."""

    def size(self) -> int: ...

    def write_at(self, offset: int, buffers: Sequence[Buffer]) -> None:
        """Write `buffers` back to back from `offset`, every byte or an `OSError`."""
        ...

    def sync(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class Storage(Protocol):
    """Opens `ByteReader`s and `ByteWriter`s on locations of one kind (see the module's call sequence)."""

    def open_read(self, location: Location) -> ByteReader: ...

    def create(self, location: Location, size: int) -> ByteWriter: ...

    def reopen(self, location: Location) -> ByteWriter: ...


def pwrite_all(fd: int, buffers: Sequence[Buffer], offset: int) -> None:
    """Write `buffers` back to back at `offset`, looping until every byte is written (`pwritev` may write less)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        done = os.pwritev(fd, views, offset)
        if done <= 0:
            raise OSError(f"pwritev wrote nothing at offset {offset}")
        offset += done
        while done:
            if done >= len(views[0]):
                done -= len(views.pop(0))
            else:
                views[0], done = views[0][done:], 0


DIRECT_ENV = "JAXRESHARD_O_DIRECT"  # "1": read sources with O_DIRECT (cold reads that bypass the page cache)
DIRECT_ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses on the device's block size
DIRECT_CHUNK = 8 << 20


class LocalReader:
    """A read-only file descriptor (sources are never written). `readinto` may be called from several threads
    at once (`preadv` keeps no file position).

    With `direct` (default: environment `JAXRESHARD_O_DIRECT=1`) reads bypass the page cache through a second
    descriptor opened `O_DIRECT`: a cold source read once is then not cached (the cache stays for the output,
    and memory is not spent on pages never read again). The wanted range is widened to 4096-byte boundaries and
    read into an aligned scratch buffer (buffers of `aligned_empty` are only 64-byte aligned), then copied. A
    file system without `O_DIRECT` (tmpfs) reads through the cache as usual."""

    coalesce_gap = 16 << 10  # runs this close are read as one range: the pages between are read anyway

    def __init__(self, path: Location, *, direct: bool | None = None) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._direct_fd = -1
        if (os.environ.get(DIRECT_ENV) == "1" if direct is None else direct) and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                pass  # not supported here (EINVAL): buffered reads are correct, only cached

    @property
    def direct(self) -> bool:
        return self._direct_fd >= 0

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def readinto(self, offset: int, buffer: memoryview) -> int:
        if self._direct_fd >= 0:
            return self._read_direct(offset, buffer)
        done, want = 0, len(buffer)
        while done < want:  # Linux returns at most ~2 GiB per call
            got = os.preadv(self._fd, [buffer[done:]], offset + done)
            if got <= 0:
                break
            done += got
        return done

    def _read_direct(self, offset: int, buffer: memoryview) -> int:
        """`readinto` through the O_DIRECT descriptor, via an aligned scratch buffer of at most DIRECT_CHUNK."""
        want, done = len(buffer), 0
        span = -(-(offset % DIRECT_ALIGN + want) // DIRECT_ALIGN) * DIRECT_ALIGN
        raw = bytearray(min(span, DIRECT_CHUNK) + DIRECT_ALIGN)
        skew = (-_address(raw)) % DIRECT_ALIGN
        scratch = memoryview(raw)[skew : skew + min(span, DIRECT_CHUNK)]
        while done < want:
            pos = offset + done
            start = pos - pos % DIRECT_ALIGN
            n = min(len(scratch), -(-(offset + want - start) // DIRECT_ALIGN) * DIRECT_ALIGN)
            got = os.preadv(self._direct_fd, [scratch[:n]], start)
            take = min(got - (pos - start), want - done)
            if take <= 0:
                break  # the file ends
            buffer[done : done + take] = scratch[pos - start : pos - start + take]
            done += take
        return done

    def prefetch(self, offset: int, nbytes: int) -> None:
        if self._direct_fd >= 0:
            return  # reads bypass the cache: filling it would only cost memory
        try:
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint

    def close(self) -> None:
        for name in ("_direct_fd", "_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)


def _address(buffer: bytearray) -> int:
    """The address of a bytearray's data (to align a scratch buffer inside it)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class LocalWriter:
    """A write-only file descriptor on a file this writer created (or continues, for `--resume`)."""

    def __init__(self, path: Path, fd: int, *, created: bool) -> None:
        self.path, self._fd, self._created = path, fd, created

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path}: the writer is closed")
        return self._fd

    def size(self) -> int:
        return os.fstat(self._open_fd()).st_size

    def write_at(self, offset: int, buffers: Sequence[Buffer]) -> None:
        pwrite_all(self._open_fd(), buffers, offset)

    def sync(self) -> None:
        os.fsync(self._open_fd())

    def close(self) -> None:
        fd = self._open_fd()
        self._fd = None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            if self._created:
                self.path.unlink(missing_ok=True)


class LocalStorage:
    """Local files, with the system calls the formats always used."""

    def open_read(self, location: Location) -> LocalReader:
        return LocalReader(location)

    def create(self, location: Location, size: int) -> LocalWriter:
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return LocalWriter(path, fd, created=True)

    def reopen(self, location: Location) -> LocalWriter:
        path = Path(location)
        return LocalWriter(path, os.open(path, os.O_WRONLY), created=False)


LOCAL = LocalStorage()
_SCHEMES: dict[str, Storage] = {}
_MOUNTS: dict[str, Storage] = {}  # a local folder standing for a remote location (see remote/mount.py) -> its storage
_SCHEME = re.compile(r"([a-z][a-z0-9+.-]+):/")  # two letters at least: "C:/" is a Windows drive


def register(scheme: str, storage: Storage) -> None:
    """Serve locations written `scheme://...` from `storage` (an object store's module calls this)."""
    _SCHEMES[scheme.lower()] = storage


def register_mount(root: Path, storage: Storage | None) -> None:
    """Serve every file under the local folder `root` from `storage` (None: stop). An object store's source or
    destination is seen by the formats as such a folder: its listing and headers are local, its bytes remote."""
    if storage is None:
        _MOUNTS.pop(os.fspath(root), None)
    else:
        _MOUNTS[os.fspath(root)] = storage


def storage_for(location: Location) -> Storage:
    """The storage of `location`: a registered scheme's, a mount's, else local files (an unregistered scheme is a
    path)."""
    text = os.fspath(location)
    match = _SCHEME.match(text)
    if match:
        return _SCHEMES.get(match.group(1), LOCAL)
    for root, storage in _MOUNTS.items():
        if text.startswith(root) and text[len(root) : len(root) + 1] in ("/", ""):
            return storage
    return LOCAL
