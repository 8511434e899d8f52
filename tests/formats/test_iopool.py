"""formats/iopool.py: tasks run concurrently, the bytes in flight stay under the bound, and a batch raises a
failure only after every read of it has ended. Asserted on counters and barriers, never on timing."""

from __future__ import annotations

import threading

import pytest

from jaxreshard.errors import ConfigError
from jaxreshard.formats import iopool
from jaxreshard.formats.iopool import IoPool, ReadBatch


def test_tasks_run_concurrently():
    pool = IoPool("t", 4, 1 << 20)
    barrier = threading.Barrier(4, timeout=30)  # broken (the test fails) unless 4 tasks run at once
    batch = ReadBatch(pool)
    for _ in range(4):
        batch.submit(barrier.wait, 10)
    batch.wait()
    assert pool.peak_bytes == 40 and pool.in_flight == 0


def test_bytes_in_flight_never_exceed_the_bound():
    pool = IoPool("t", 8, 100)
    active, seen, lock = [0], [], threading.Lock()

    def task(n):
        def run():
            with lock:
                active[0] += n
                seen.append(active[0])
            with lock:
                active[0] -= n

        return run

    batch = ReadBatch(pool)
    sizes = [30, 30, 30, 30, 60, 10, 100, 5] * 20
    for n in sizes:
        batch.submit(task(n), n)
    batch.wait()
    assert pool.peak_bytes <= 100 and max(seen) <= 100 and pool.in_flight == 0
    assert pool.peak_bytes >= 60  # several ran at once: the bound is what limits them, not a queue of one


def test_a_task_larger_than_the_bound_runs_alone():
    pool = IoPool("t", 4, 100)
    batch = ReadBatch(pool)
    batch.submit(lambda: None, 10)
    batch.submit(lambda: None, 500)
    batch.wait()
    assert pool.peak_bytes == 500  # it waited for the 10 to finish, then ran by itself


def test_a_batch_raises_the_first_failure_after_every_read_ended():
    pool = IoPool("t", 4, 1 << 20)
    release, done = threading.Event(), []

    def slow():
        release.wait(30)
        done.append(1)

    def fail():
        release.set()
        raise OSError(5, "Input/output error")

    batch = ReadBatch(pool)
    batch.submit(slow, 1)
    batch.submit(fail, 1)
    assert batch.pending
    with pytest.raises(OSError, match="Input/output"):
        batch.wait()
    assert done == [1] and not batch.pending and pool.in_flight == 0


@pytest.mark.parametrize("raw", ["0", "lots", "5000"])
def test_a_bad_setting_is_a_one_line_config_error(monkeypatch, raw):
    monkeypatch.setattr(iopool, "_POOLS", {})
    monkeypatch.setenv("JAXRESHARD_IO_THREADS", raw)
    with pytest.raises(ConfigError, match=r"JAXRESHARD_IO_THREADS=.*whole number from 1 to 4096"):
        iopool.pool("read")


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setattr(iopool, "_POOLS", {})
    monkeypatch.setenv("JAXRESHARD_IO_THREADS", "3")
    monkeypatch.setenv("JAXRESHARD_IO_INFLIGHT_MIB", "7")
    pool = iopool.pool("write")
    assert (pool.threads, pool.max_bytes) == (3, 7 << 20) and iopool.pool("write") is pool


def test_the_defaults_are_eight_threads_and_256_mib(monkeypatch):
    monkeypatch.setattr(iopool, "_POOLS", {})
    monkeypatch.delenv("JAXRESHARD_IO_THREADS", raising=False)
    monkeypatch.delenv("JAXRESHARD_IO_INFLIGHT_MIB", raising=False)
    pool = iopool.pool("read")
    assert (pool.threads, pool.max_bytes) == (8, 256 << 20)


def test_a_forked_child_gets_pools_of_its_own(monkeypatch):
    parent = IoPool("read", 2, 100)
    parent.made_in = -1  # as if made by the process this one was forked from
    monkeypatch.setattr(iopool, "_POOLS", {"read": parent})
    assert iopool.pool("read") is not parent and iopool.pool("read") is iopool.pool("read")
