"""Uploads that stream while a file is written.

A file being written is spooled to its local temporary (so the formats' read-backs, `--verify` and the hashing
work unchanged) and uploaded as a multipart upload while it grows: every `part_size` bytes written in file order
go out at once, the rest after `close`; `finish` (at the commit) waits for the upload, checks the stored size,
and empties the spool to a sparse placeholder of the same size (later reads go to the store); `abort` aborts the
upload (no object appears).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

from ..formats.storage import Buffer, LocalWriter
from .urls import RemoteError, remote_error

MIN_PART = 8 << 20  # multipart parts (S3: >= 5 MiB but the last, at most 10,000 parts)
MAX_PARTS = 9000
UPLOADS_PER_FILE = 2  # parts in flight per file (each held in memory): rank files upload side by side


def part_size(size: int) -> int:
    """Parts of at least `MIN_PART`, whole MiB, few enough for the store's 10,000-part limit."""
    return max(MIN_PART, math.ceil(size / MAX_PARTS / (1 << 20)) << 20)


class _Aborted(Exception):
    pass


class RemoteWriter:
    """A `ByteWriter`: a local spool (`LocalWriter`) plus a background multipart upload of its written prefix."""

    def __init__(self, spool: LocalWriter, store: Any, key: str, size: int, where: str, on_done) -> None:
        self._spool, self._store, self._key, self._size, self._where = spool, store, key, size, where
        self._on_done = on_done  # called with the spool's path by `finish`, once the object is complete
        self._part = part_size(size)
        self._cond = threading.Condition()
        self._ranges: list[tuple[int, int]] = []  # written ranges beyond the frontier
        self._frontier, self._closing, self._aborted, self._done = 0, False, False, False
        self.completed = False
        self._error: BaseException | None = None
        self._read_fd = os.open(spool.path, os.O_RDONLY)
        self._thread = threading.Thread(target=self._upload, name="jaxreshard-upload", daemon=True)
        self._thread.start()

    def size(self) -> int:
        return self._size

    @property
    def spool_path(self):
        return self._spool.path

    def write_at(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self._spool.write_at(offset, buffers)
        n = sum(len(memoryview(b).cast("B")) for b in buffers)
        with self._cond:
            self._ranges.append((offset, offset + n))
            self._ranges.sort()
            while self._ranges and self._ranges[0][0] <= self._frontier:
                self._frontier = max(self._frontier, self._ranges.pop(0)[1])
            self._cond.notify_all()

    def _chunks(self):
        sent = 0

        def ready() -> bool:
            return self._aborted or self._closing or self._frontier - sent >= self._part

        while True:
            with self._cond:
                self._cond.wait_for(ready)
                if self._aborted:
                    raise _Aborted
                last = self._closing  # read once, with `end`: closing later must not skip the tail
                end = self._size if last else sent + (self._frontier - sent) // self._part * self._part
            while sent < end:
                chunk = os.pread(self._read_fd, min(self._part, end - sent), sent)
                if not chunk:
                    raise OSError(f"{self._spool.path}: the spool ended at byte {sent} of {self._size}")
                yield chunk
                sent += len(chunk)
            if last:
                return

    def _upload(self) -> None:
        import obstore

        try:
            obstore.put(self._store, self._key, self._chunks(), use_multipart=self._size > self._part,
                        chunk_size=self._part, max_concurrency=UPLOADS_PER_FILE)  # fmt: skip
            self.completed = True  # the object exists now (a failed run deletes it: see destination.close)
        except BaseException as e:  # noqa: BLE001 - handed to the writing thread at close/abort
            self._error = e

    def sync(self) -> None:
        self._spool.sync()

    def close(self) -> None:
        """Complete the spool and let the upload finish in the background (the next files' work overlaps it);
        `finish` waits for it."""
        self._spool.close()  # durable locally first: the upload reads the spool
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def finish(self) -> None:
        """Wait for the upload; then the spool becomes a sparse placeholder and reads go to the store (called at
        the commit, after every check that reads the spool)."""
        if self._done:
            return
        self._done = True
        self._thread.join()
        os.close(self._read_fd)
        if self._error is None:
            self._check_size()
        if self._error is not None:
            with contextlib.suppress(OSError):
                self._spool.path.unlink()
            if isinstance(self._error, RemoteError):
                raise self._error
            raise remote_error(self._error, self._where, "uploading") from None
        os.truncate(self._spool.path, 0)  # the bytes are in the store now: keep only a sparse placeholder
        os.truncate(self._spool.path, self._size)
        self._on_done(self._spool.path)

    def _check_size(self) -> None:
        """The stored object has exactly the spool's size (a cheap HEAD: an upload that lost bytes is caught here,
        before the manifest names the file)."""
        import obstore

        try:
            stored = int(obstore.head(self._store, self._key)["size"])
        except Exception as e:  # noqa: BLE001 - reported by the caller like an upload failure
            self._error = e
            return
        if stored != self._size:
            self._error = RemoteError(f"{self._where}: the store holds {stored} bytes after the upload, not the "
                                      f"{self._size} written; nothing was committed, run again")

    def abort(self) -> None:
        """Abort the upload (unless it already completed) and remove the spool."""
        if self._done:
            return
        self._done = True
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
        self._thread.join()  # obstore aborts the multipart upload when its input fails
        with contextlib.suppress(OSError):
            os.close(self._read_fd)
        self._spool.abort()
