"""Property-based fuzzing of the MindSpore `.ckpt` reader: real files written by MindSpore (the fixtures), mutated
byte by byte, and random byte strings, must give either a consistent index or a FormatError naming the file,
never IndexError/ValueError/struct.error/MemoryError, within a deadline and bounded Python memory.

Deterministic (`derandomize=True`) so the suite stays reproducible and fast.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxreshard.errors import FormatError
from jaxreshard.formats.mindspore_ckpt import read_ckpt_index

from ..wire import field as _field

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mindspore" / "ckpt"
SEEDS = [
    (FIXTURES / name).read_bytes()
    for name in ("mp4/rank_0/checkpoint_0.ckpt", "dp1mp2pp2/rank_3/checkpoint_3.ckpt",
                 "dp4_opt/rank_1/checkpoint_1.ckpt", "dp2mp2_layout__to__dp4_opt/rank_2/checkpoint_2.ckpt")
]  # fmt: skip
MEMORY_LIMIT = 32 << 20  # Python allocations while indexing a few-KiB file; a length taken on trust would blow it
FUZZ = settings(max_examples=250, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


@st.composite
def mutated(draw) -> bytes:
    """A fixture file with 1-4 edits: flipped bits, overwritten runs (often 0xff: endless varints, huge lengths),
    insertions, deletions and truncation."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            run = draw(st.binary(min_size=1, max_size=12) | st.just(b"\xff" * 10) | st.just(b"\x80" * 11))
            data[pos : pos + len(run)] = run
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@st.composite
def records(draw) -> bytes:
    """Well-formed protobuf records (Checkpoint.Value{tag, TensorProto{dims, tensor_type, tensor_content}}) with
    hostile values: unknown types, huge or many dims, contents that disagree with the dims, odd tags."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        tag = draw(st.sampled_from(["w", "", "a\0b", "layer.0.weight"]) | st.text(max_size=8))
        kind = draw(st.sampled_from(["Float32", "Int8", "BFloat16", "str", "Int4", "Complex64", ""]))
        dims = draw(st.lists(st.integers(0, 8) | st.sampled_from([0, 1 << 40, (1 << 64) - 1]), max_size=6)
                    | st.just([1] * 70))
        content = draw(st.binary(max_size=64))
        tensor = b"".join(_field(1, d) for d in dims) + _field(2, kind.encode()) + _field(3, content)
        out += _field(1, _field(1, tag.encode("utf-8", "surrogatepass")) + _field(2, tensor))
    return out


def _check(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.ckpt"
    path.write_bytes(data)
    for verify_crc in (False, True):
        tracemalloc.start()
        try:
            index = read_ckpt_index(path, verify_crc=verify_crc)
        except FormatError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            continue
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < MEMORY_LIMIT, f"indexing a {len(data)}-byte file allocated {peak} bytes"
        for entry in index.tensors.values():  # a success must describe bytes that lie inside the file
            assert sum(n for _, n in entry.segments) == entry.nbytes
            assert all(0 <= offset and offset + n <= index.data_end for offset, n in entry.segments)
        assert set(index.tensors) | set(index.extras) == set(index.names)


@FUZZ
@given(data=mutated())
def test_mutated_fixture_files(tmp_path, data):
    _check(tmp_path, data)


@FUZZ
@given(data=st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: b"\x0a" + b))
def test_random_bytes(tmp_path, data):
    _check(tmp_path, data)


@FUZZ
@given(data=records())
def test_structured_records_with_hostile_values(tmp_path, data):
    _check(tmp_path, data)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_the_seeds_themselves_index_cleanly(tmp_path, seed):
    """The mutations start from files the reader accepts, so each failure above is the mutation's doing."""
    path = tmp_path / "seed.ckpt"
    path.write_bytes(SEEDS[seed])
    assert read_ckpt_index(path, verify_crc=True).tensors
