"""The object-store byte layer on obstore's in-memory store: uploads carry every byte whatever the order and
timing of writes and close, and ranged reads through the shared cache return exactly the object's bytes."""

from __future__ import annotations

import os
import time

import numpy as np
import obstore
import pytest
from obstore.store import MemoryStore

from jaxreshard.formats.storage import LOCAL
from jaxreshard.remote import objects, uploads
from jaxreshard.remote.objects import RemoteReader
from jaxreshard.remote.uploads import MIN_PART, RemoteWriter


def upload(tmp_path, data: bytes, pieces: list[tuple[int, int]], store) -> list[str]:
    done = []
    spool = LOCAL.create(tmp_path / "spool.bin", len(data))
    writer = RemoteWriter(spool, store, "out.bin", len(data), "mem://out.bin", lambda p: done.append(str(p)))
    for lo, hi in pieces:
        writer.write_at(lo, [data[lo:hi]])
    writer.close()
    writer.finish()
    return done


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
def test_every_byte_arrives_whatever_the_write_order(tmp_path, order):
    data = np.random.default_rng(1).integers(0, 256, 3 * MIN_PART + 12345, dtype=np.uint8).tobytes()
    cuts = [0, 1000, MIN_PART - 7, MIN_PART + 5, 2 * MIN_PART, 3 * MIN_PART + 1, len(data)]
    pieces = list(zip(cuts, cuts[1:]))
    if order == "reversed":
        pieces.reverse()
    elif order == "shuffled":
        np.random.default_rng(2).shuffle(pieces)
    store = MemoryStore()
    assert upload(tmp_path, data, pieces, store) == [str(tmp_path / "spool.bin")]
    assert bytes(obstore.get(store, "out.bin").bytes()) == data
    assert os.stat(tmp_path / "spool.bin").st_blocks == 0  # emptied to a sparse placeholder of the same size
    assert os.path.getsize(tmp_path / "spool.bin") == len(data)


def test_closing_while_a_part_is_being_read_keeps_the_tail(tmp_path, monkeypatch):
    """The upload thread reading a full part when the file is closed must still send the last, partial part."""
    real = os.pread

    def slow(fd, n, offset):
        time.sleep(0.05)
        return real(fd, n, offset)

    monkeypatch.setattr(uploads.os, "pread", slow)
    data = os.urandom(2 * MIN_PART + 999)
    store = MemoryStore()
    upload(tmp_path, data, [(0, len(data))], store)
    assert bytes(obstore.get(store, "out.bin").bytes()) == data


def test_an_aborted_upload_leaves_no_object(tmp_path):
    store = MemoryStore()
    spool = LOCAL.create(tmp_path / "spool.bin", 2 * MIN_PART)
    writer = RemoteWriter(spool, store, "out.bin", 2 * MIN_PART, "mem://out.bin", lambda p: None)
    writer.write_at(0, [b"x" * MIN_PART])
    writer.abort()
    with pytest.raises(FileNotFoundError):
        obstore.head(store, "out.bin")
    assert not (tmp_path / "spool.bin").exists()


def test_ranged_reads_through_the_cache(monkeypatch):
    monkeypatch.setattr(objects, "BLOCK", 1 << 16)
    objects.drop_cache()
    data = os.urandom(5 * (1 << 16) + 77)
    store = MemoryStore()
    obstore.put(store, "obj", data)
    reader = RemoteReader(store, "obj", len(data), "mem://obj", "v1")
    rng = np.random.default_rng(3)
    for _ in range(200):  # small reads across block edges (column blocks), and a read past the end
        lo = int(rng.integers(0, len(data)))
        n = int(rng.integers(1, 3 * (1 << 16)))
        buf = bytearray(n)
        got = reader.readinto(lo, memoryview(buf))
        assert got == min(n, len(data) - lo) and bytes(buf[:got]) == data[lo : lo + got]
    obstore.put(store, "obj", data[::-1])  # a new version is never served from the old one's blocks
    buf = bytearray(100)
    RemoteReader(store, "obj", len(data), "mem://obj", "v2").readinto(0, memoryview(buf))
    assert bytes(buf) == data[::-1][:100]
    objects.drop_cache()
