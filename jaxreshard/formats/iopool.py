"""Many reads and writes in flight at once, from a small thread pool, bounded in bytes.

A fast NVMe disk (or an object store, where each `readinto` is one ranged GET) is left mostly idle by one
request at a time: it reaches its speed only with several large requests queued. `os.preadv`/`os.pwritev`
(and numpy copies) release the GIL, so a few threads keep a disk busy while the main thread plans the next
step. Every task carries the bytes it holds (a read's buffer, a queued write's data); `submit` and `reserve`
wait while the pool's bytes in flight would exceed `max_bytes`, so memory stays flat whatever the caller
queues. `peak_bytes` records the most ever in flight (tests assert the bound on it).

Two pools, so a write never waits behind reads or the other way round: `pool("read")` and `pool("write")`
(threads and bytes from `JAXRESHARD_IO_THREADS` / `JAXRESHARD_IO_INFLIGHT_MIB` when set). Their threads are
made per process (a forked child gets its own: threads do not survive a fork).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from ..errors import ConfigError

DEFAULT_THREADS = 8  # queue depth enough for NVMe at MiB-sized requests; threads mostly sleep in the kernel
DEFAULT_INFLIGHT_BYTES = 256 << 20


def _env_int(name: str, default: int, scale: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default * scale
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1 or value > 4096:
        raise ConfigError(f"environment variable {name}={raw!r}: expected a whole number from 1 to 4096")
    return value * scale


class IoPool:
    """A thread pool whose queued and running tasks together hold at most `max_bytes` (one larger task runs
    alone)."""

    def __init__(self, name: str, threads: int, max_bytes: int) -> None:
        self.name, self.threads, self.max_bytes = name, threads, max_bytes
        self.peak_bytes = 0
        self.made_in = os.getpid()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def reserve(self, nbytes: int) -> None:
        """Wait until `nbytes` more fit under the bound (at once when nothing is in flight), then count them."""
        with self._cond:
            while self._in_flight and self._in_flight + nbytes > self.max_bytes:
                self._cond.wait()
            self._in_flight += nbytes
            self.peak_bytes = max(self.peak_bytes, self._in_flight)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self._in_flight -= nbytes
            self._cond.notify_all()

    def run(self, task: Callable[[], None]) -> Future:
        """Run `task` on a pool thread, counting no bytes (the caller reserved them)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix=f"jaxreshard-{self.name}")
        return self._executor.submit(task)

    def submit(self, task: Callable[[], None], nbytes: int) -> Future:
        """Run `task`, holding `nbytes` of the bound until it ends (waits first while the bound is full)."""
        self.reserve(nbytes)
        try:
            future = self.run(task)
        except BaseException:
            self.release(nbytes)
            raise
        future.add_done_callback(lambda _: self.release(nbytes))
        return future


class ReadBatch:
    """Reads submitted together and awaited together: `wait` returns when every one has ended, and raises the
    first failure only then (so no pool thread still writes into a buffer the caller goes on to free or reuse)."""

    def __init__(self, pool: IoPool) -> None:
        self.pool = pool
        self._futures: list[Future] = []

    @property
    def pending(self) -> bool:
        """Reads were submitted and not yet waited for."""
        return bool(self._futures)

    def submit(self, task: Callable[[], None], nbytes: int) -> None:
        self._futures.append(self.pool.submit(task, nbytes))

    def wait(self) -> None:
        futures, self._futures = self._futures, []
        wait_futures(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error

    def settle(self) -> None:
        """Wait for every read without raising (cleanup after another failure)."""
        futures, self._futures = self._futures, []
        wait_futures(futures)


_POOLS: dict[str, IoPool] = {}


def pool(name: str) -> IoPool:
    """The process's pool `name` ("read" or "write"), made on first use from the environment's settings."""
    found = _POOLS.get(name)
    if found is None or found.made_in != os.getpid():  # a forked child: its parent's counts and locks are not its
        threads = _env_int("JAXRESHARD_IO_THREADS", DEFAULT_THREADS)
        max_bytes = _env_int("JAXRESHARD_IO_INFLIGHT_MIB", DEFAULT_INFLIGHT_BYTES >> 20, 1 << 20)
        found = _POOLS[name] = IoPool(name, threads, max_bytes)
    return found
