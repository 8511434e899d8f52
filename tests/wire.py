"""A minimal protobuf wire codec for tests, written apart from the package's own so that it checks them.

Only what MindSpore's files use: varints (wire type 0) and length-delimited fields (wire type 2).
"""

from __future__ import annotations

from collections.abc import Iterator


def varint(n: int) -> bytes:
    """`n` (non-negative) as a base-128 varint, low group first."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, payload: bytes | int) -> bytes:
    """One field: an int as a varint (wire type 0), bytes as length-delimited (wire type 2)."""
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`."""
    value = shift = 0
    while True:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of every field of one message, in order: an int for a varint, else the bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        if key & 7 == 0:
            value, pos = read_varint(buf, pos)
        else:
            n, pos = read_varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        yield key >> 3, value
