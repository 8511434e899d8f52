"""Property-based fuzzing of the safetensors header reader and the Hugging Face index reader.

Inputs start from real files written by the `safetensors` package and are mutated byte by byte and field by field
(JSON values replaced by hostile ones: huge or negative numbers, booleans, lists, nesting, surrogates, NULs).
Properties: only a FormatError naming the file (or success), in bounded time and Python memory; and whatever
jaxreshard accepts, the `safetensors` library accepts too, with the same tensors at the same offsets, so a
header jaxreshard trusts is never one the reference implementation would refuse.
Deterministic (`derandomize=True`) so the suite stays reproducible and fast.
"""

from __future__ import annotations

import json
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxreshard.errors import FormatError
from jaxreshard.formats.safetensors_io import HF_INDEX, read_hf_index, read_safetensors_index

MEMORY_LIMIT = 32 << 20
STRICTER = r"unsupported dtype|more than the 64|empty name|NUL character"  # jaxreshard's deliberate extra rules
FUZZ = settings(max_examples=250, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


def _seed_files() -> list[bytes]:
    import tempfile

    tensors = [
        {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int8), "c": np.float64(1.5)},
        {"w": np.zeros((3, 2, 2), np.uint16), "empty": np.zeros((0, 4), np.float32)},
    ]
    out = []
    with tempfile.TemporaryDirectory() as d:
        for i, t in enumerate(tensors):
            path = Path(d) / f"{i}.safetensors"
            save_file({k: np.asarray(v) for k, v in t.items()}, path, metadata={"format": "pt"} if i else None)
            out.append(path.read_bytes())
    return out


SEEDS = _seed_files()
HOSTILE = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=True)
    | st.sampled_from(["F32", "U8", "", "\0", "\ud800", "..", "x" * 300]) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def field_mutations(draw) -> bytes:
    """A real file whose header has 1-3 JSON edits: a field replaced by a hostile value, deleted or added, a
    parameter renamed, an offset nudged; the data area sometimes grows or shrinks."""
    header, body = _split(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        names = [k for k in header if k != "__metadata__"]
        op = draw(st.sampled_from(["value", "delete", "rename", "nudge", "metadata", "add"]))
        if op == "add" or not names:
            header[draw(st.text(max_size=5))] = draw(HOSTILE)
            continue
        name = draw(st.sampled_from(names))
        entry = header[name]
        if op == "value" and isinstance(entry, dict):
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(HOSTILE)
        elif op == "delete" and isinstance(entry, dict) and entry:
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif op == "rename":
            header[draw(st.sampled_from(["", "a\0", "\ud800", "__metadata__", "b", "a"]) | st.text(max_size=3))] = (
                header.pop(name))
        elif op == "nudge" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            i = draw(st.integers(0, len(entry["data_offsets"]) - 1)) if entry["data_offsets"] else 0
            if entry["data_offsets"] and type(entry["data_offsets"][i]) is int:
                entry["data_offsets"][i] += draw(st.sampled_from([-8, -1, 1, 4, 1 << 62]))
        elif op == "metadata":
            header["__metadata__"] = draw(HOSTILE | st.dictionaries(st.text(max_size=3), HOSTILE, max_size=2))
    tail = draw(st.sampled_from(["same", "extra", "short"]))
    body = body + b"\0" * 3 if tail == "extra" else body[:-1] if tail == "short" and body else body
    return _pack(header, body)


@st.composite
def byte_mutations(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert"]))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            run = draw(st.binary(min_size=1, max_size=8) | st.just(b"[" * 8) | st.just(b"\xff" * 8))
            data[pos : pos + len(run)] = run
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _library_view(path: Path) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    try:
        with safe_open(path, "np") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except SafetensorError:
        return None


def _check(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        entries, metadata = read_safetensors_index(path)
    except FormatError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        if _library_view(path) is not None:  # refused what the library reads: only the documented stricter rules
            assert re.search(STRICTER, str(e)), f"refused a header the safetensors library accepts: {e}"
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT
    library = _library_view(path)
    assert library is not None, "jaxreshard accepted a header the safetensors library refuses"
    assert {e.param: e.shape for e in entries} == {k: shape for k, (_, shape) in library.items()}
    assert all(isinstance(v, str) for v in metadata.values())


@FUZZ
@given(data=field_mutations())
def test_header_field_mutations(tmp_path, data):
    _check(tmp_path, data)


@FUZZ
@given(data=byte_mutations())
def test_header_byte_mutations(tmp_path, data):
    _check(tmp_path, data)


@FUZZ
@given(raw=st.binary(max_size=200) | HOSTILE.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")))
def test_random_headers(tmp_path, raw):
    _check(tmp_path, struct.pack("<Q", len(raw)) + raw)


# ------------------------------------------------------------------------------------------ Hugging Face index

PART_NAMES = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
WEIGHT_MAP = {"a": PART_NAMES[0], "b": PART_NAMES[0], "c": PART_NAMES[1]}


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    """Two part files inside `hf/`, and a valid safetensors file outside it that an escaping entry could reach."""
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"a": np.zeros(2, np.float32), "b": np.ones(3, np.int8)}, folder / PART_NAMES[0])
    save_file({"c": np.ones(1, np.float64)}, folder / PART_NAMES[1])
    save_file({"c": np.ones(1, np.float64)}, tmp_path / "outside.safetensors")
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    return folder


@st.composite
def indexes(draw) -> bytes:
    weight_map: dict = dict(WEIGHT_MAP)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["retarget", "delete", "add", "value"]))
        key = draw(st.sampled_from(sorted(weight_map) or ["a"]))
        if op == "retarget":
            weight_map[key] = draw(st.sampled_from(
                ["../outside.safetensors", str(Path("/etc/passwd")), "link.safetensors", "a\0b", "", ".", "..",
                 "./" + PART_NAMES[1], PART_NAMES[1], "hf/" + PART_NAMES[0]]))  # fmt: skip
        elif op == "delete":
            weight_map.pop(key, None)
        elif op == "add":
            weight_map[draw(st.text(max_size=3))] = draw(st.sampled_from(PART_NAMES))
        else:
            weight_map[key] = draw(HOSTILE)
    index = draw(st.just({"metadata": {}, "weight_map": weight_map}) | HOSTILE.map(lambda v: {"weight_map": v}))
    raw = json.dumps(index).encode("utf-8", "surrogatepass")
    return draw(st.just(raw) | st.just(b"[" * 5000) | st.just(raw[: len(raw) // 2]) | st.just(b"\xff" + raw))


@FUZZ
@given(raw=indexes())
def test_hf_index_mutations(hf_folder, raw):
    (hf_folder / HF_INDEX).write_bytes(raw)
    try:
        entries = read_hf_index(hf_folder)
    except FormatError as e:
        assert HF_INDEX in str(e) or str(hf_folder) in str(e)
        assert "\n" not in str(e)
        return
    root = hf_folder.resolve()
    assert all(e.path.resolve().parent == root for e in entries), "an entry escaped the source folder"
    assert sorted(e.param for e in entries) == ["a", "b", "c"], "the index and the part files must match exactly"
