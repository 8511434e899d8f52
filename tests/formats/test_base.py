"""formats/base.py's pwrite_all: every byte lands at its offset even when the kernel writes less per call."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxreshard.formats import base
from jaxreshard.formats.base import pwrite_all


def _write(path, buffers, offset):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pwrite_all(fd, buffers, offset)
    finally:
        os.close(fd)


def test_buffers_are_written_back_to_back(tmp_path):
    path = tmp_path / "f"
    array = np.arange(6, dtype="<u2")
    _write(path, [b"head", b"", memoryview(array), bytearray(b"!")], 3)
    assert path.read_bytes() == b"\0\0\0head" + array.tobytes() + b"!"


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real = os.pwritev
    calls = []

    def three_bytes_at_most(fd, views, offset):
        calls.append(offset)
        first = bytes(views[0][:3])
        return real(fd, [first], offset)

    monkeypatch.setattr(base.os, "pwritev", three_bytes_at_most)
    path = tmp_path / "f"
    _write(path, [b"abcdefg", b"hi"], 0)
    assert path.read_bytes() == b"abcdefghi"
    assert calls == [0, 3, 6, 7]  # the third call ends the first buffer; the fourth writes the second


def test_a_write_of_nothing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(base.os, "pwritev", lambda fd, views, offset: 0)
    with pytest.raises(OSError, match="pwritev wrote nothing at offset 5"):
        _write(tmp_path / "f", [b"x"], 5)


# --- read_box: the parallel read engine ---------------------------------------------------------------------

import threading  # noqa: E402

from jaxreshard.box import Box  # noqa: E402
from jaxreshard.errors import FormatError  # noqa: E402
from jaxreshard.formats import iopool, storage  # noqa: E402
from jaxreshard.formats.base import FileHandles, TensorEntry, coalesce, read_box  # noqa: E402
from jaxreshard.formats.iopool import IoPool  # noqa: E402


class _Recorder(storage.LocalReader):
    """A local reader that records every request and how many ran at once; `barrier` makes the first requests
    wait for each other (the test fails with a broken barrier unless they really run concurrently)."""

    def __init__(self, path, gap, barrier=None):
        super().__init__(path)
        self.coalesce_gap, self.barrier = gap, barrier
        self.requests, self.active, self.most = [], 0, 0
        self.lock = threading.Lock()

    def readinto(self, offset, buffer):
        with self.lock:
            self.requests.append((offset, len(buffer)))
            self.active += 1
            self.most = max(self.most, self.active)
            first = len(self.requests) <= (self.barrier.parties if self.barrier else 0)
        try:
            if first:
                self.barrier.wait()
            return super().readinto(offset, buffer)
        finally:
            with self.lock:
                self.active -= 1


def _entry(path, array, header=24):
    path.write_bytes(b"h" * header + array.tobytes())
    return TensorEntry("w", array.dtype, array.shape, path, ((header, array.nbytes),))


def _read(entry, box, reader):
    handles = FileHandles()
    handles._readers[entry.path] = reader
    out = np.empty(box.shape, entry.dtype)
    with handles:
        read_box(handles, entry, box, out)
    return out


def test_coalesce_groups_close_runs_and_splits_long_ones():
    runs = [(0, 10, 0), (20, 10, 10), (100, 10, 20), (110, 35, 30)]
    assert list(coalesce(runs, 10, 1000)) == [runs[:2], runs[2:]]
    assert list(coalesce(runs, 0, 1000)) == [[runs[0]], [runs[1]], runs[2:]]  # touching runs are one range
    assert list(coalesce(runs, 100, 30)) == [runs[:2], [runs[2]], [(110, 30, 30)], [(140, 5, 60)]]
    assert list(coalesce([(50, 4, 0), (10, 4, 4)], 100, 1000)) == [[(50, 4, 0)], [(10, 4, 4)]]  # never backwards


def test_a_long_read_is_many_reads_in_flight_within_the_bound(tmp_path, monkeypatch):
    array = np.random.default_rng(0).standard_normal((256, 256)).astype("<f4")  # 256 KiB
    monkeypatch.setattr(base, "READ_CHUNK", 16 << 10)
    pool = IoPool("read", 8, 64 << 10)  # 4 pieces in flight at most
    monkeypatch.setattr(iopool, "_POOLS", {"read": pool})
    entry = _entry(tmp_path / "w.bin", array)
    reader = _Recorder(entry.path, 0, threading.Barrier(4, timeout=30))
    out = _read(entry, Box.full(array.shape), reader)
    assert out.tobytes() == array.tobytes()
    assert sorted(reader.requests) == [(24 + i * (16 << 10), 16 << 10) for i in range(16)]
    assert reader.most == 4 and pool.peak_bytes == 64 << 10 and pool.in_flight == 0


@pytest.mark.parametrize(("gap", "requests"), [(0, 40), (64, 1), (20, 40)])
def test_close_runs_are_read_as_one_range_and_cut_apart(tmp_path, gap, requests):
    array = np.arange(40 * 10, dtype="<i4").reshape(40, 10)  # rows of 40 bytes
    entry = _entry(tmp_path / "w.bin", array)
    reader = _Recorder(entry.path, gap)
    box = Box((0, 3), (40, 7))  # 16-byte runs 24 bytes apart
    out = _read(entry, box, reader)
    assert out.tobytes() == np.ascontiguousarray(array[:, 3:7]).tobytes()
    assert len(reader.requests) == requests
    if requests == 1:
        assert reader.requests == [(24 + 12, 39 * 40 + 16)]  # first wanted byte to last, nothing beyond


def test_a_short_read_inside_a_coalesced_range_names_the_missing_run(tmp_path):
    array = np.arange(4 * 10, dtype="<i4").reshape(4, 10)
    entry = _entry(tmp_path / "w.bin", array)
    entry.path.write_bytes(entry.path.read_bytes()[: 24 + 3 * 40 + 8])  # the last row's wanted run is cut short
    with pytest.raises(FormatError, match=r"'w' is truncated: wanted 16 bytes at offset 156,"):
        _read(entry, Box((0, 3), (4, 7)), _Recorder(entry.path, 64))


def test_inside_a_batch_reads_are_only_submitted(tmp_path):
    array = np.arange(1000, dtype="<i8")
    entry = _entry(tmp_path / "w.bin", array)
    gate = threading.Event()

    class Gated(_Recorder):
        def readinto(self, offset, buffer):
            gate.wait(30)
            return super().readinto(offset, buffer)

    handles = FileHandles()
    handles._readers[entry.path] = Gated(entry.path, 0)
    out = np.zeros(1000, "<i8")
    with handles:
        with handles.batch() as batch:
            read_box(handles, entry, Box.full((1000,)), out)
            assert batch.pending and not out.any()  # the read waits on the gate: not done yet
            gate.set()
        assert out.tolist() == array.tolist()  # the batch was waited for at its end


def test_a_reader_may_ask_for_larger_requests(tmp_path):
    array = np.arange(1 << 16, dtype="<i4")  # 256 KiB
    entry = _entry(tmp_path / "w.bin", array)
    reader = _Recorder(entry.path, 0)
    reader.read_chunk = 100 << 10
    out = _read(entry, Box.full(array.shape), reader)
    assert out.tobytes() == array.tobytes()
    assert sorted(reader.requests) == [(24, 100 << 10), (24 + (100 << 10), 100 << 10), (24 + (200 << 10), 56 << 10)]
