"""Bytes of stored objects: ranged reads through a shared block cache, and uploads that stream as they are written.

Reads: an object is read in `BLOCK`-sized blocks (aligned to the object), adjacent missing blocks fetched by one
ranged GET (at most `COALESCE_BLOCKS`; up to `FETCH_THREADS` requests in flight; `If-Match` on the listed ETag,
so a replaced object is an error, never a mix of versions), kept in one process-wide
LRU cache of at most `cache_bytes()` so that many small reads (a column block is one read per row) cost one
request per block, and `prefetch` hints (the executor gives the next parameter's ranges) overlap the network
with the current parameter's work. A read failing mid-transfer (a dropped connection) is requested again.

Writes: a file being written is spooled to its local temporary (so the formats' read-backs, `--verify` and the
hashing work unchanged) and uploaded as a multipart upload while it grows: every `part_size` bytes written in
file order go out at once, the rest at `close`, which completes the upload; `abort` aborts it (no object
appears). The spool is then emptied to a sparse placeholder of the same size, and later reads go to the store.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..formats.storage import Buffer, LocalWriter
from .urls import RemoteError, remote_error

BLOCK = 8 << 20
COALESCE_BLOCKS = 8  # one request fetches at most this many adjacent blocks (64 MiB)
FETCH_THREADS = 8
READ_ATTEMPTS = 4  # a request failing mid-body (after obstore's own retries) is made again this often
MIN_PART = 8 << 20  # multipart parts (S3: >= 5 MiB but the last, at most 10,000 parts)
MAX_PARTS = 9000
UPLOADS_PER_FILE = 2  # parts in flight per file (each held in memory): rank files upload side by side
CACHE_ENV = "JAXRESHARD_REMOTE_CACHE_MIB"


def cache_bytes() -> int:
    """The block cache's capacity: `JAXRESHARD_REMOTE_CACHE_MIB` MiB, 128 by default (bounded memory)."""
    try:
        return max(int(os.environ.get(CACHE_ENV, "128")), 16) << 20
    except ValueError:
        return 128 << 20


class _Shared:
    """The process's fetch threads and block cache (made anew after a fork: threads do not survive one)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="jaxreshard-fetch")
        self.lock = threading.Lock()
        self.blocks: collections.OrderedDict[tuple, tuple[Future, int, int]] = collections.OrderedDict()
        self.held = 0
        self.capacity = cache_bytes()

    def evict(self) -> None:
        while self.held > self.capacity and self.blocks:
            _, (_, _, n) = self.blocks.popitem(last=False)
            self.held -= n


_SHARED: _Shared | None = None


def shared() -> _Shared:
    global _SHARED
    if _SHARED is None or _SHARED.pid != os.getpid():
        _SHARED = _Shared()
    return _SHARED


def drop_cache() -> None:
    """Forget every cached block (a view is released: its memory goes back, and nothing stale outlives it)."""
    sh = shared()
    with sh.lock:
        sh.blocks.clear()
        sh.held = 0


def get_run(store: Any, key: str, where: str, start: int, end: int, etag: str | None) -> Any:
    """Bytes `start..end` of the object in one GET, of the version listed (`If-Match` on its ETag: an object
    replaced mid-run is an error, never a mix of two versions)."""
    import obstore
    from obstore import exceptions as x

    options: dict[str, Any] = {"range": (start, end)}
    if etag:
        options["if_match"] = etag
    for attempt in range(READ_ATTEMPTS):
        try:
            return obstore.get(store, key, options=options).bytes()  # type: ignore[arg-type]
        except x.PreconditionError:
            raise RemoteError(f"{where}: changed while this run was reading it (its ETag is not the one listed); "
                              "run again once nothing writes it") from None
        except (x.GenericError, OSError) as e:  # a dropped connection or a body cut short: ask again (an HTTP
            # status means obstore's own retries, with backoff and a time budget, are spent: no more attempts)
            if isinstance(e, FileNotFoundError) or attempt == READ_ATTEMPTS - 1 or re.search(r"status", str(e)):
                raise remote_error(e, where, f"reading bytes {start}-{end}") from None
            time.sleep(0.2 * 2**attempt)
        except Exception as e:
            raise remote_error(e, where, f"reading bytes {start}-{end}") from None
    raise AssertionError("unreachable")


def _runs(blocks: list[int]) -> list[list[int]]:
    """`blocks` (ascending) cut into runs of adjacent blocks, at most `COALESCE_BLOCKS` long."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and runs[-1][-1] == b - 1 and len(runs[-1]) < COALESCE_BLOCKS:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


class RemoteReader:
    """A `ByteReader` of one object of known size (the listing gave it)."""

    def __init__(self, store: Any, key: str, size: int, where: str, version: str, etag: str | None = None) -> None:
        """`where`: the object's URL, and with `version` (its ETag, or a token of this run's upload) the
        identity of its bytes in the shared cache; `etag`: every read is of that version (If-Match)."""
        self._store, self._key, self._size, self._where, self._etag = store, key, size, where, etag
        self._id = (where, size, version)

    def size(self) -> int:
        return self._size

    def _blocks(self, first: int, last: int) -> dict[int, tuple[Future, int]]:
        """(future, offset in its result) of blocks `first..last`: cached, in flight, or submitted now as runs of
        adjacent blocks, one GET each."""
        sh = shared()
        found: dict[int, tuple[Future, int]] = {}
        missing: list[int] = []
        with sh.lock:
            for b in range(first, last + 1):
                hit = sh.blocks.get((*self._id, b))
                if hit is None:
                    missing.append(b)
                else:
                    sh.blocks.move_to_end((*self._id, b))
                    found[b] = hit[:2]
            for run in _runs(missing):
                start, end = run[0] * BLOCK, min(self._size, (run[-1] + 1) * BLOCK)
                future = sh.pool.submit(get_run, self._store, self._key, self._where, start, end, self._etag)
                for b in run:
                    n = min(BLOCK, self._size - b * BLOCK)
                    sh.blocks[(*self._id, b)] = (future, b * BLOCK - start, n)
                    sh.held += n
                    found[b] = (future, b * BLOCK - start)
            sh.evict()
        return found

    def readinto(self, offset: int, buffer: memoryview) -> int:
        n = max(0, min(len(buffer), self._size - offset))
        if n == 0:
            return 0
        window = max(1, shared().capacity // BLOCK // 2)  # blocks in flight for one read: a read bigger than
        first, last = offset // BLOCK, (offset + n - 1) // BLOCK  # the cache streams through it
        for lo in range(first, last + 1, window):
            blocks = self._blocks(lo, min(last, lo + window - 1))
            for b in sorted(blocks):
                future, at = blocks[b]
                data = memoryview(future.result())[at : at + BLOCK]
                start = max(offset, b * BLOCK)
                stop = min(offset + n, b * BLOCK + len(data))
                buffer[start - offset : stop - offset] = data[start - b * BLOCK : stop - b * BLOCK]
        return n

    def prefetch(self, offset: int, nbytes: int) -> None:
        nbytes = min(nbytes, self._size - offset, shared().capacity // 2)
        if nbytes > 0:
            self._blocks(offset // BLOCK, (offset + nbytes - 1) // BLOCK)

    def close(self) -> None:
        pass  # the cache keeps blocks for other readers of the same object; nothing to release


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
        self._error: BaseException | None = None
        self._read_fd = os.open(spool.path, os.O_RDONLY)
        self._thread = threading.Thread(target=self._upload, name="jaxreshard-upload", daemon=True)
        self._thread.start()

    def size(self) -> int:
        return self._size

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
