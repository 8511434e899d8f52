"""formats/storage.py: local readers and writers keep the `Storage` call sequence, and every format goes through it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxreshard.box import Box
from jaxreshard.errors import FormatError
from jaxreshard.formats import storage
from jaxreshard.formats.base import FileHandles, TensorEntry, read_box
from jaxreshard.formats.mindspore_ckpt_write import CkptRankWriter
from jaxreshard.formats.safetensors_write import SafetensorsWriter
from jaxreshard.formats.storage import LOCAL, LocalStorage, register, storage_for


def test_a_written_file_reads_back_byte_for_byte(tmp_path):
    path = tmp_path / "sub" / "f.bin"  # the parent is made: object stores have no folders to make first
    payload = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    out = LOCAL.create(path, 1010)
    assert out.size() == 1010 and path.stat().st_size == 1010  # preallocated
    out.write_at(500, [payload[500:], memoryview(b"tail-bytes")])  # any order, several buffers back to back
    out.write_at(0, [payload[:500]])
    out.sync()
    out.close()
    assert path.read_bytes() == payload + b"tail-bytes"
    reader = LOCAL.open_read(path)
    try:
        assert reader.size() == 1010
        buf = bytearray(300)
        assert reader.readinto(200, memoryview(buf)) == 300
        assert bytes(buf) == payload[200:500]
        reader.prefetch(0, 1010)  # a hint only
    finally:
        reader.close()


def test_create_refuses_an_existing_file_and_leaves_it_alone(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        LOCAL.create(path, 4)
    assert path.read_bytes() == b"precious"


def test_a_short_read_returns_what_is_there(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789")
    reader = LOCAL.open_read(path)
    try:
        buf = bytearray(8)
        assert reader.readinto(6, memoryview(buf)) == 4
        assert bytes(buf[:4]) == b"6789"
        assert reader.readinto(10, memoryview(buf)) == 0
    finally:
        reader.close()


def test_read_box_reports_a_short_read_as_truncation(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(np.arange(6, dtype="<f4").tobytes())  # the "header" says 8 floats, the file holds 6
    entry = TensorEntry("w", np.dtype("<f4"), (2, 4), path, ((0, 32),))
    out = np.zeros((2, 4), np.float32)
    with FileHandles() as handles, pytest.raises(FormatError, match=r"'w' is truncated: wanted 32 bytes at offset 0"):
        read_box(handles, entry, Box.full((2, 4)), out)
    with FileHandles() as handles:
        read_box(handles, entry, Box((0, 0), (1, 4)), out[:1])  # the first row is all there
    assert out[0].tolist() == [0, 1, 2, 3]


def test_abort_leaves_no_file_and_the_writer_closed(tmp_path):
    path = tmp_path / "f.bin"
    out = LOCAL.create(path, 16)
    out.write_at(0, [b"x" * 16])
    out.abort()
    assert not path.exists()
    with pytest.raises(ValueError, match="closed"):
        out.write_at(0, [b"y"])
    out.abort()  # twice is harmless


def test_abort_of_a_continued_file_keeps_it(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abcdef")
    out = LOCAL.reopen(path)
    assert out.size() == 6
    out.write_at(2, [b"CD"])
    out.abort()  # not this writer's file to remove (`--resume` continues a killed run's)
    assert path.read_bytes() == b"abCDef"


def test_rank_writers_abort_removes_their_partial_files(tmp_path):
    st, ck = tmp_path / "a.safetensors", tmp_path / "a.ckpt"
    params = [("w", np.dtype("<f4"), (2, 2))]
    writer = SafetensorsWriter(st, params)
    ckpt = CkptRankWriter(ck, params, crc=True)
    assert st.exists() and ck.exists()
    writer.abort()
    ckpt.abort()
    assert not st.exists() and not ck.exists()


def test_a_short_write_continues_and_a_full_disk_is_an_os_error(tmp_path, monkeypatch):
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, views, off: real(fd, [views[0][:3]], off))
    path = tmp_path / "f.bin"
    out = LOCAL.create(path, 10)
    out.write_at(0, [b"0123", b"456789"])
    out.close()
    assert path.read_bytes() == b"0123456789"
    monkeypatch.setattr(os, "pwritev", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    out = LOCAL.create(tmp_path / "g.bin", 4)
    with pytest.raises(OSError, match="No space left"):
        out.write_at(0, [b"abcd"])
    out.abort()


class _Recording(LocalStorage):
    """Local files under `mem:`, recording what is opened through the seam (what an object store would serve)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def open_read(self, location):
        self.calls.append("read")
        return super().open_read(str(location).removeprefix("mem:"))

    def create(self, location, size):
        self.calls.append("create")
        return super().create(str(location).removeprefix("mem:"), size)


def test_a_registered_scheme_serves_its_locations(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_SCHEMES", {})
    recording = _Recording()
    register("mem", recording)
    assert storage_for(f"mem:{tmp_path}/x") is recording
    assert storage_for(tmp_path / "x") is LOCAL and storage_for("C:/x") is LOCAL and storage_for("other:/x") is LOCAL
    loc = f"mem:{tmp_path}/a.ckpt"
    values = np.arange(3, dtype="<i4")
    with CkptRankWriter(loc, [("w", values.dtype, (3,))], crc=True) as writer:  # its CRC is read back: a read
        writer.write("w", values)
    from jaxreshard.formats.mindspore_ckpt import read_ckpt_index

    entry = read_ckpt_index(tmp_path / "a.ckpt").tensors["w"]  # parse the real file, then read it through "mem:"
    out = np.zeros(3, "<i4")
    with FileHandles() as handles:
        read_box(handles, TensorEntry("w", entry.dtype, entry.shape, loc, entry.segments), Box.full((3,)), out)
    assert out.tolist() == [0, 1, 2] and recording.calls == ["create", "read", "read"]


@pytest.mark.parametrize(("offset", "length"), [(0, 4096), (1, 10), (4095, 2), (5000, 30000), (60000, 9000),
                                                (65535, 100), (70000, 10)])  # fmt: skip
def test_o_direct_reads_equal_buffered_reads(tmp_path, monkeypatch, offset, length):
    monkeypatch.setattr(storage, "DIRECT_CHUNK", 8192)  # several scratch rounds per read
    payload = np.random.default_rng(1).integers(0, 256, 65536 + 7, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(payload)
    reader = storage.LocalReader(path, direct=True)
    try:
        if not reader.direct:
            pytest.skip("this file system does not support O_DIRECT")
        buf = bytearray(length)
        got = reader.readinto(offset, memoryview(buf))
        want = payload[offset : offset + length]
        assert got == len(want) and bytes(buf[:got]) == want  # short only where the file ends
    finally:
        reader.close()


def test_o_direct_is_chosen_by_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10)
    monkeypatch.delenv(storage.DIRECT_ENV, raising=False)
    reader = storage.LocalReader(path)
    assert not reader.direct
    reader.close()
    monkeypatch.setenv(storage.DIRECT_ENV, "1")
    reader = LOCAL.open_read(path)
    try:
        buf = bytearray(10)
        assert reader.readinto(0, memoryview(buf)) == 10 and bytes(buf) == b"x" * 10
        assert reader.direct or os.uname().sysname != "Linux" or _no_o_direct(path)
    finally:
        reader.close()
    reader.close()  # twice is harmless


def _no_o_direct(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return True
    return False
