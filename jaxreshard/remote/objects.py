"""Bytes of stored objects: ranged reads through a shared block cache (uploads: uploads.py).

Reads: an object is read in `BLOCK`-sized blocks (aligned to the object), adjacent missing blocks fetched by one
ranged GET (at most `COALESCE_BLOCKS`; up to `FETCH_THREADS` requests in flight; `If-Match` on the listed ETag,
so a replaced object is an error, never a mix of versions), kept in one process-wide
LRU cache of at most `cache_bytes()` so that many small reads (a column block is one read per row) cost one
request per block, and `prefetch` hints (the executor gives the next parameter's ranges) overlap the network
with the current parameter's work. A read failing mid-transfer (a dropped connection) is requested again.
"""

from __future__ import annotations

import collections
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .urls import RemoteError, remote_error

BLOCK = 8 << 20
COALESCE_BLOCKS = 8  # one request fetches at most this many adjacent blocks (64 MiB)
FETCH_THREADS = 8
READ_ATTEMPTS = 4  # a request failing mid-body (after obstore's own retries) is made again this often
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
    """A `ByteReader` of one object of known size (the listing gave it). `readinto` may be called from several
    threads; the read engine (formats/base.read_box) hands it runs of up to `read_chunk` bytes (one GET of
    adjacent blocks each) and merges runs closer than `coalesce_gap` (a column block's rows: one request)."""

    read_chunk = COALESCE_BLOCKS * BLOCK
    coalesce_gap = 1 << 20

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
                if len(data) != min(BLOCK, self._size - b * BLOCK):  # the store answered short: never zeros
                    raise RemoteError(f"{self._where}: the store returned {len(data)} bytes of block {b}, not "
                                      f"{min(BLOCK, self._size - b * BLOCK)}; the object changed or is damaged")
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
