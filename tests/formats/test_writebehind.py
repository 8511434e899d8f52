"""formats/writebehind.py: writes of different files overlap, one file's stay in order, the bytes queued stay
under the bound, and a failed write surfaces (unchanged, so the run names the file) at the next call or at
`close`. Asserted on counters and barriers, never on timing."""

from __future__ import annotations

import errno
import hashlib
import os
import threading

import numpy as np
import pytest

from jaxreshard.cli import main
from jaxreshard.formats import iopool
from jaxreshard.formats.iopool import IoPool
from jaxreshard.formats.safetensors_write import SafetensorsWriter
from jaxreshard.formats.storage import LOCAL
from jaxreshard.formats.writebehind import WriteBehind

LAYOUT = "configs/layouts/llama_dp2mp4.yaml"


class _Recording:
    """A ByteWriter in memory that records its calls, how many of its writes ran at once, and can be held."""

    def __init__(self, size, hold=None, fail_at=None):
        self.data = bytearray(size)
        self.calls, self.active, self.most = [], 0, 0
        self.hold, self.fail_at, self.lock = hold, fail_at, threading.Lock()

    def size(self):
        return len(self.data)

    def write_at(self, offset, buffers):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            if self.hold is not None:
                self.hold()
            if offset == self.fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raw = b"".join(bytes(b) for b in buffers)
            self.data[offset : offset + len(raw)] = raw
            self.calls.append(("write", offset))
        finally:
            with self.lock:
                self.active -= 1

    def sync(self):
        self.calls.append(("sync",))

    def close(self):
        self.calls.append(("close",))

    def abort(self):
        self.calls.append(("abort",))


def test_writes_of_different_files_overlap():
    barrier = threading.Barrier(3, timeout=30)  # broken (the test fails) unless 3 files are written at once
    outs = [_Recording(8, hold=barrier.wait) for _ in range(3)]
    writers = [WriteBehind(out, IoPool("w", 4, 1 << 20)) for out in outs]
    for i, writer in enumerate(writers):
        writer.write_at(0, [bytes([i]) * 8])
    for writer in writers:
        writer.close()
    assert [bytes(out.data) for out in outs] == [bytes([i]) * 8 for i in range(3)]
    assert [out.calls for out in outs] == [[("write", 0), ("close",)]] * 3


def test_one_files_writes_run_one_at_a_time_in_order():
    out = _Recording(400)
    writer = WriteBehind(out, IoPool("w", 4, 1 << 20))
    for i in range(40):
        writer.write_at(10 * i, [bytes([i]) * 4, memoryview(bytes([i]) * 6)])
    writer.sync()
    assert out.calls[:-1] == [("write", 10 * i) for i in range(40)] and out.calls[-1] == ("sync",)
    assert out.most == 1 and bytes(out.data) == b"".join(bytes([i]) * 10 for i in range(40))


def test_queued_bytes_stay_under_the_bound():
    pool = IoPool("w", 4, 100)
    outs = [_Recording(1000) for _ in range(4)]
    writers = [WriteBehind(out, pool) for out in outs]
    for i in range(40):
        writers[i % 4].write_at(30 * (i // 4), [b"x" * 30])
    for writer in writers:
        writer.close()
    assert pool.peak_bytes <= 100 and pool.in_flight == 0
    assert all(bytes(out.data[:300]) == b"x" * 300 for out in outs)


def test_a_failed_write_surfaces_at_close_and_the_file_is_aborted():
    out = _Recording(100, fail_at=10)
    pool = IoPool("w", 2, 1 << 20)
    writer = WriteBehind(out, pool)
    writer.write_at(0, [b"a" * 10])
    writer.write_at(10, [b"b" * 10])  # fails on the pool thread
    writer.write_at(20, [b"c" * 10])  # queued behind it: never written
    with pytest.raises(OSError) as failure:
        writer.close()
    assert failure.value.errno == errno.ENOSPC
    assert out.calls == [("write", 0), ("abort",)] and pool.in_flight == 0


def test_a_failed_write_surfaces_at_the_next_write():
    out = _Recording(100, fail_at=0)
    writer = WriteBehind(out, IoPool("w", 2, 1 << 20))
    writer.write_at(0, [b"a"])
    with pytest.raises(OSError, match="No space"):
        writer.flush()
    with pytest.raises(OSError, match="No space"):
        writer.write_at(1, [b"b"])
    writer.abort()
    assert out.calls == [("abort",)]


def test_rank_files_and_their_hashes_are_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(iopool, "_POOLS", {"write": IoPool("write", 3, 2 << 10)})  # tiny bound: writes wait
    rng = np.random.default_rng(0)
    arrays = {f"p{i}": rng.standard_normal((16, 9 + i)).astype("<f4") for i in range(12)}
    params = [(k, a.dtype, a.shape) for k, a in arrays.items()]
    writers = [SafetensorsWriter(tmp_path / f"r{r}.safetensors", params) for r in range(3)]
    for name, array in arrays.items():
        for writer in writers:
            writer.write(name, array)
    records = [writer.close() for writer in writers]
    for record in records:
        ((path, rec),) = record.items()
        raw = path.read_bytes()
        assert rec.size == len(raw) and rec.sha256 == hashlib.sha256(raw).hexdigest()
        assert raw.endswith(b"".join(a.tobytes() for a in arrays.values()))
    assert 1280 <= iopool.pool("write").peak_bytes <= 2 << 10  # the largest write is 1280 bytes


def test_a_deferred_write_failure_is_one_line_naming_its_file(llama, tmp_path, monkeypatch, capsys):
    real = os.pwritev

    def full_for_rank_5(fd, views, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("checkpoint_5.safetensors") and offset > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, views, offset)

    monkeypatch.setattr(os, "pwritev", full_for_rank_5)
    dst = tmp_path / "out"
    assert main(["convert", "-q", "--src", str(llama), "--dst", str(dst), "--dst-layout", LAYOUT]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jaxreshard: error: writing rank_5/checkpoint_5.safetensors failed: No space left on device; "
                   "free space (or quota) or choose another destination")
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_local_files_through_write_behind_read_back(tmp_path):
    writer = WriteBehind(LOCAL.create(tmp_path / "f.bin", 6))
    writer.write_at(3, [b"def"])
    writer.write_at(0, [b"abc"])
    writer.close()
    assert (tmp_path / "f.bin").read_bytes() == b"abcdef"


def test_abort_drops_the_writes_not_yet_started():
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(30)

    out = _Recording(100, hold=hold)
    pool = IoPool("w", 2, 1 << 20)
    writer = WriteBehind(out, pool)
    writer.write_at(0, [b"a"])
    started.wait(30)  # the first write is running (held); the next ones are queued behind it
    writer.write_at(1, [b"b"])
    writer.write_at(2, [b"c"])
    real_settle = writer._settle
    writer._settle = lambda: (release.set(), real_settle())  # let the running write end once abort dropped the rest
    writer.abort()
    assert out.calls == [("write", 0), ("abort",)] and pool.in_flight == 0
