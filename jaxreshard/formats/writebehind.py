"""Write-behind: a rank writer's `write_at` returns at once and the bytes are written on the write pool, so
the writes of different rank files overlap each other and the next parameter's reads.

Each file's writes run one after another in the order they were queued (a `ByteWriter` need not take
concurrent calls: an object store's multipart upload may not), different files' writes run side by side.
Queued data is held (not copied) until written, and counts against the write pool's bound on bytes in
flight (`iopool`), so memory stays flat: `write_at` waits while the bound is full. The caller must not change
a buffer after handing it over (the executor never does: every array written is fresh).

A failed write is kept and raised, unchanged (an `OSError` stays one, so the caller still names the file), by
the next `write_at`, `sync` or `close` of the same file; `close` and `abort` first wait for the queue, so no
pool thread ever writes to a closed descriptor, and `close` returns only when every byte is written.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

from . import iopool
from .storage import Buffer, ByteWriter


class WriteBehind:
    """A `ByteWriter` that queues writes to `out` on the write pool (see the module docstring)."""

    def __init__(self, out: ByteWriter, pool: iopool.IoPool | None = None) -> None:
        self._out = out
        self._pool = pool if pool is not None else iopool.pool("write")
        self._queue: deque[tuple[int, Sequence[Buffer], int]] = deque()
        self._running = False  # a drain task is queued or running for this file
        self._error: BaseException | None = None
        self._idle = threading.Condition()

    def size(self) -> int:
        return self._out.size()

    def write_at(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self._raise_error()
        nbytes = sum(memoryview(b).nbytes for b in buffers)
        self._pool.reserve(nbytes)
        with self._idle:
            self._queue.append((offset, list(buffers), nbytes))
            if self._running:
                return
            self._running = True
        try:
            self._pool.run(self._drain)
        except BaseException:
            self._discard()
            raise

    def _drain(self) -> None:
        """Write the queue in order until it is empty; after a failure only release what is left."""
        while True:
            with self._idle:
                if not self._queue or self._error is not None:
                    self._discard_locked()
                    self._running = False
                    self._idle.notify_all()
                    return
                offset, buffers, nbytes = self._queue.popleft()
            try:
                self._out.write_at(offset, buffers)
            except BaseException as e:  # kept for the caller's next call on this file
                with self._idle:
                    self._error = e
            finally:
                self._pool.release(nbytes)

    def _discard(self) -> None:
        with self._idle:
            self._discard_locked()
            self._running = False
            self._idle.notify_all()

    def _discard_locked(self) -> None:
        while self._queue:
            self._pool.release(self._queue.popleft()[2])

    def _settle(self) -> None:
        """Wait until no write of this file is queued or running."""
        with self._idle:
            while self._running:
                self._idle.wait()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """Return when every queued write is on the file (not yet durable); raise a write's failure."""
        self._settle()
        self._raise_error()

    def sync(self) -> None:
        self.flush()
        self._out.sync()

    def close(self) -> None:
        """Every byte written, then `out.close()`; after a failed write, the file is aborted and the failure
        raised."""
        self._settle()
        if self._error is not None:
            self._out.abort()
            raise self._error
        self._out.close()

    def abort(self) -> None:
        """Drop the writes not yet started, wait for the one running, then `out.abort()`."""
        with self._idle:
            self._discard_locked()
        self._settle()
        self._out.abort()
