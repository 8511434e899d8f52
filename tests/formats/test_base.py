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
