"""safetensors reading, box reads, the header-first writer, file splitting and HF indexes.

Expectations come from the `safetensors` package itself (`save_file`, `safe_open`, `load_file`) and from numpy
slices, never from jaxreshard's own code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxreshard.box import Box
from jaxreshard.errors import FormatError
from jaxreshard.formats.base import FileHandles, aligned_empty, read_box
from jaxreshard.formats.safetensors_io import (
    HF_INDEX,
    SafetensorsWriter,
    header_bytes,
    read_hf_index,
    read_safetensors_index,
    split_into_files,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
CODES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BF16, "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8), "I16": np.dtype(np.int16), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64),
    "U8": np.dtype(np.uint8), "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}  # fmt: skip


def _values(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == np.bool_:
        return (rng.integers(0, 2, n) == 1).reshape(shape)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True).reshape(shape)
    return rng.standard_normal(n).astype(np.float32).astype(dtype).reshape(shape)


def _all_dtypes_tensors() -> dict[str, np.ndarray]:
    tensors = {}
    for i, (code, dtype) in enumerate(CODES.items()):
        tensors[f"t.{code}.2d"] = _values(dtype, (3, 5), seed=i)
        tensors[f"t.{code}.0d"] = _values(dtype, (), seed=100 + i)
    tensors["t.F32.3d"] = _values(CODES["F32"], (4, 3, 6), seed=7)
    return tensors


def _raw_header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def _write_raw(path: Path, header: bytes | str | dict, data: bytes = b"", *, claimed_len: int | None = None) -> Path:
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    raw = raw.encode() if isinstance(raw, str) else raw
    path.write_bytes(struct.pack("<Q", len(raw) if claimed_len is None else claimed_len) + raw + data)
    return path


def _read_all(entry) -> np.ndarray:
    out = aligned_empty(entry.shape, entry.dtype)
    with FileHandles() as handles:
        read_box(handles, entry, Box.full(entry.shape), out)
    return out


# --------------------------------------------------------------------------------------------- reading


def test_index_of_every_dtype_matches_the_safetensors_header(tmp_path):
    tensors = _all_dtypes_tensors()
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"format": "np", "k": "v"})
    header_len, header = _raw_header(path)
    entries, metadata = read_safetensors_index(path)

    assert metadata == {"format": "np", "k": "v"}
    assert sorted(e.param for e in entries) == sorted(tensors)
    offsets = [e.segments[0][0] for e in entries]
    assert offsets == sorted(offsets), "entries come in data-offset order"
    for entry in entries:
        info = header[entry.param]
        begin, end = info["data_offsets"]
        assert entry.dtype == CODES[info["dtype"]] == tensors[entry.param].dtype
        assert entry.shape == tuple(info["shape"]) == tensors[entry.param].shape
        assert entry.path == path
        assert entry.segments == ((8 + header_len + begin, end - begin),)
        assert entry.nbytes == tensors[entry.param].nbytes


def test_full_reads_of_every_dtype_equal_the_saved_arrays(tmp_path):
    tensors = _all_dtypes_tensors()
    path = tmp_path / "all.safetensors"
    save_file(tensors, path)
    for entry in read_safetensors_index(path)[0]:
        got = _read_all(entry)
        assert got.dtype == tensors[entry.param].dtype
        assert got.tobytes() == tensors[entry.param].tobytes(), entry.param


@pytest.mark.parametrize(
    "box",
    [
        Box((0, 0, 0), (4, 3, 6)),  # whole
        Box((1, 0, 0), (3, 3, 6)),  # leading rows
        Box((0, 1, 0), (4, 2, 6)),  # middle dim
        Box((0, 0, 2), (4, 3, 5)),  # columns
        Box((1, 1, 1), (3, 3, 4)),  # interior block
        Box((3, 2, 5), (4, 3, 6)),  # one element at the end
        Box((2, 0, 0), (2, 3, 6)),  # empty
    ],
    ids=str,
)
@pytest.mark.parametrize("code", ["F32", "BF16", "I64", "BOOL", "U8", "F64"])
def test_read_box_equals_the_numpy_slice(tmp_path, box, code):
    array = _values(CODES[code], (4, 3, 6), seed=3)
    path = tmp_path / "box.safetensors"
    save_file({"pad": np.arange(3, dtype=np.uint8), "x": array}, path)
    (entry,) = [e for e in read_safetensors_index(path)[0] if e.param == "x"]
    out = aligned_empty(box.shape, entry.dtype)
    with FileHandles() as handles:
        read_box(handles, entry, box, out)
    expected = array[box.to_slices()]
    assert out.shape == expected.shape
    assert out.tobytes() == expected.tobytes()


def test_read_box_of_a_0d_tensor(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"s": np.array(-123456789012, dtype=np.int64), "f": np.array(2.5, dtype=np.float16)}, path)
    for entry in read_safetensors_index(path)[0]:
        out = aligned_empty((), entry.dtype)
        with FileHandles() as handles:
            read_box(handles, entry, Box((), ()), out)
        assert out.tobytes() == load_file(path)[entry.param].tobytes()


def test_read_box_writes_into_a_c_contiguous_subview(tmp_path):
    array = _values(CODES["F32"], (6, 4), seed=1)
    path = tmp_path / "v.safetensors"
    save_file({"x": array}, path)
    (entry,) = read_safetensors_index(path)[0]
    buf = np.full((8, 4), -1, dtype=np.float32)
    with FileHandles() as handles:
        read_box(handles, entry, Box((1, 0), (4, 4)), buf[2:5])
    assert np.array_equal(buf[2:5], array[1:4])
    assert (buf[:2] == -1).all() and (buf[5:] == -1).all()


# --------------------------------------------------------------------------------------------- corrupt input


def _assert_format_error(path: Path, *, param: str | None = None) -> FormatError:
    with pytest.raises(FormatError) as info:
        read_safetensors_index(path)
    message = str(info.value)
    assert str(path) in message, message
    if param is not None:
        assert param in message, message
    assert "\n" not in message.strip()
    return info.value


@pytest.mark.parametrize("nbytes", [0, 1, 7])
def test_file_shorter_than_8_bytes(tmp_path, nbytes):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * nbytes)
    _assert_format_error(path)


def test_header_length_claims_more_than_the_file_has(tmp_path):
    path = _write_raw(tmp_path / "big.safetensors", {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                      b"\0" * 4, claimed_len=10_000)  # fmt: skip
    _assert_format_error(path)


def test_absurd_header_length(tmp_path):
    path = _write_raw(tmp_path / "huge.safetensors", b"{}", claimed_len=2**63)
    _assert_format_error(path)


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00garbage", b'{"x": {"dtype": "F32"', b"[1, 2, 3]", b"42"])
def test_header_not_a_json_object(tmp_path, raw):
    path = _write_raw(tmp_path / "bad.safetensors", raw)
    _assert_format_error(path)


def test_metadata_that_is_not_a_mapping(tmp_path):
    path = _write_raw(tmp_path / "meta.safetensors", {"__metadata__": ["a", "b"]})
    _assert_format_error(path)


def test_duplicate_key_in_the_header(tmp_path):
    raw = (
        '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
        ' "w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'
    )
    path = _write_raw(tmp_path / "dup.safetensors", raw, b"\0" * 16)
    _assert_format_error(path, param="w")


def test_truncated_file_data_offsets_past_the_end(tmp_path):
    path = tmp_path / "trunc.safetensors"
    save_file({"a": np.zeros((4, 4), np.float32), "zz_last": np.ones((8, 8), np.float64)}, path)
    _, header = _raw_header(path)
    last = max(header, key=lambda k: header[k]["data_offsets"][1] if k != "__metadata__" else -1)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 3)
    _assert_format_error(path, param=last)


def test_data_offsets_inconsistent_with_shape(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    path = _write_raw(tmp_path / "incons.safetensors", header, b"\0" * 24)
    _assert_format_error(path, param="w")


def test_data_offsets_reversed(tmp_path):
    header = {"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 4]}, "v": {"dtype": "U8", "shape": [4],
              "data_offsets": [4, 0]}}  # fmt: skip
    path = _write_raw(tmp_path / "rev.safetensors", header, b"\0" * 4)
    _assert_format_error(path, param="v")


@pytest.mark.parametrize("code", ["F8_E4M3", "C64", "float32", None])
def test_unknown_dtype(tmp_path, code):
    header = {"w": {"dtype": code, "shape": [1], "data_offsets": [0, 4]}}
    path = _write_raw(tmp_path / "dt.safetensors", header, b"\0" * 4)
    _assert_format_error(path, param="w")


@pytest.mark.parametrize("shape", [[-1, 2], "2x2", [2.0], None])
def test_bad_shape(tmp_path, shape):
    header = {"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 4]}}
    path = _write_raw(tmp_path / "sh.safetensors", header, b"\0" * 4)
    _assert_format_error(path, param="w")


def test_missing_file(tmp_path):
    _assert_format_error(tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------------------------- writing


def test_header_bytes_pads_to_8_and_describes_back_to_back_tensors():
    for names in (["a"], ["ab"], ["abc", "d"], ["x" * 13]):
        params = [(n, np.dtype(np.float32), (i + 1, 3)) for i, n in enumerate(names)]
        head = header_bytes(params, None)
        (n,) = struct.unpack("<Q", head[:8])
        assert len(head) == 8 + n
        assert len(head) % 8 == 0
        header = json.loads(head[8:])
        offset = 0
        for name, _, shape in params:
            nbytes = int(np.prod(shape)) * 4
            assert header[name] == {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        assert head[8:].rstrip(b" ").endswith(b"}")  # padded with trailing spaces only
    head = header_bytes([("w", BF16, ())], {"format": "pt"})
    assert len(head) % 8 == 0
    assert json.loads(head[8:])["__metadata__"] == {"format": "pt"}


def test_writer_output_reads_back_with_safetensors(tmp_path):
    tensors = _all_dtypes_tensors()
    params = [(name, a.dtype, a.shape) for name, a in tensors.items()]
    path = tmp_path / "out" / "w.safetensors"
    writer = SafetensorsWriter(path, params, {"who": "test"})
    for name in reversed(list(tensors)):  # any order
        writer.write(name, tensors[name])
    writer.close()

    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape, name
        assert loaded[name].tobytes() == array.tobytes(), name
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"who": "test"}
        for name, array in tensors.items():
            assert f.get_tensor(name).tobytes() == array.tobytes()
    entries, metadata = read_safetensors_index(path)
    assert [e.param for e in entries] == list(tensors), "file order = the order given"
    assert metadata == {"who": "test"}


def test_writer_writes_the_header_first_at_its_final_size(tmp_path):
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    b = np.arange(5, dtype=np.float64)
    params = [("a", a.dtype, a.shape), ("b", b.dtype, b.shape)]
    path = tmp_path / "h.safetensors"
    writer = SafetensorsWriter(path, params)
    head = header_bytes(params, None)
    assert path.stat().st_size == len(head) + a.nbytes + b.nbytes
    assert path.read_bytes()[: len(head)] == head
    entries, _ = read_safetensors_index(path)  # already a valid (zero-filled) file
    assert [(e.param, e.shape) for e in entries] == [("a", (3, 4)), ("b", (5,))]
    writer.write("b", b)
    writer.write("a", a)
    writer.close()
    assert path.stat().st_size == len(head) + a.nbytes + b.nbytes
    assert load_file(path)["a"].tobytes() == a.tobytes()


def test_writer_writes_non_contiguous_arrays_in_c_order(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[:, ::2]  # strided
    fortran = np.asfortranarray(base)
    path = tmp_path / "nc.safetensors"
    writer = SafetensorsWriter(path, [("v", view.dtype, view.shape), ("f", fortran.dtype, fortran.shape)])
    writer.write("v", view)
    writer.write("f", fortran)
    writer.close()
    loaded = load_file(path)
    assert np.array_equal(loaded["v"], base[:, ::2])
    assert np.array_equal(loaded["f"], base)


def test_writer_rejects_wrong_dtype_and_shape(tmp_path):
    path = tmp_path / "r.safetensors"
    writer = SafetensorsWriter(path, [("w", np.dtype(np.float32), (2, 3))])
    with pytest.raises(ValueError, match="w"):
        writer.write("w", np.zeros((2, 3), np.float64))
    with pytest.raises(ValueError, match="w"):
        writer.write("w", np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="w"):
        writer.write("w", np.zeros((2, 3), BF16))
    writer.write("w", np.ones((2, 3), np.float32))
    writer.close()
    assert np.array_equal(load_file(path)["w"], np.ones((2, 3), np.float32))


def test_writer_refuses_to_close_with_unwritten_params(tmp_path):
    path = tmp_path / "u.safetensors"
    writer = SafetensorsWriter(path, [("done", np.dtype(np.uint8), (2,)), ("missing.param", np.dtype(np.uint8), (2,))])
    writer.write("done", np.zeros(2, np.uint8))
    with pytest.raises(Exception, match="missing.param"):
        writer.close()


def test_writer_never_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "exists.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(OSError):
        SafetensorsWriter(path, [("w", np.dtype(np.uint8), (1,))])
    assert path.read_bytes() == b"precious"


# --------------------------------------------------------------------------------------------- splitting


@pytest.mark.parametrize(
    ("sizes", "limit", "expected"),
    [
        ([4, 4, 4], 8, [[0, 1], [2]]),
        ([4, 4], 8, [[0, 1]]),  # exactly full
        ([2, 7, 1], 8, [[0], [1, 2]]),  # greedy in order, no reordering
        ([3, 3, 3, 3, 3], 9, [[0, 1, 2], [3, 4]]),
        ([10, 1], 5, [[0], [1]]),  # oversize tensor alone
        ([1, 10, 1], 5, [[0], [1], [2]]),
        ([1, 1, 10], 5, [[0, 1], [2]]),
        ([10, 10], 5, [[0], [1]]),
        ([0, 5, 0], 5, [[0, 1, 2]]),
        ([5, 3, 2, 9], None, [[0, 1, 2, 3]]),  # None = one file
        ([7], 1, [[0]]),
    ],
)
def test_split_into_files(sizes, limit, expected):
    assert split_into_files(sizes, limit) == expected


# --------------------------------------------------------------------------------------------- HF index


def _hf_dir(tmp_path: Path, parts: dict[str, dict[str, np.ndarray]], weight_map: dict[str, str] | None = None) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    for name, tensors in parts.items():
        save_file(tensors, d / name)
    if weight_map is None:
        weight_map = {p: name for name, tensors in parts.items() for p in tensors}
    total = sum(a.nbytes for tensors in parts.values() for a in tensors.values())
    (d / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return d


def test_read_hf_index(tmp_path):
    a, b, c = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.int8), np.array(1.5, BF16)
    d = _hf_dir(tmp_path, {"model-00001-of-00002.safetensors": {"a": a, "c": c},
                           "model-00002-of-00002.safetensors": {"b": b}})  # fmt: skip
    entries = read_hf_index(d)
    by_name = {e.param: e for e in entries}
    assert set(by_name) == {"a", "b", "c"}
    assert by_name["a"].path == d / "model-00001-of-00002.safetensors"
    assert by_name["b"].path == d / "model-00002-of-00002.safetensors"
    for name, array in {"a": a, "b": b, "c": c}.items():
        assert by_name[name].shape == array.shape and by_name[name].dtype == array.dtype
        assert _read_all(by_name[name]).tobytes() == array.tobytes()


def test_hf_param_in_weight_map_but_absent_from_its_file(tmp_path):
    d = _hf_dir(tmp_path, {"p1.safetensors": {"a": np.zeros(2, np.float32)}},
                weight_map={"a": "p1.safetensors", "ghost.weight": "p1.safetensors"})  # fmt: skip
    with pytest.raises(FormatError) as info:
        read_hf_index(d)
    assert "ghost.weight" in str(info.value)
    assert str(d) in str(info.value)


def test_hf_part_file_missing(tmp_path):
    d = _hf_dir(tmp_path, {"p1.safetensors": {"a": np.zeros(2, np.float32)}},
                weight_map={"a": "p1.safetensors", "b": "p2.safetensors"})  # fmt: skip
    with pytest.raises(FormatError) as info:
        read_hf_index(d)
    assert "p2.safetensors" in str(info.value)


@pytest.mark.parametrize("mapped_to", ["p1.safetensors", "p2.safetensors"])
def test_hf_duplicate_param_across_files(tmp_path, mapped_to):
    d = _hf_dir(
        tmp_path,
        {"p1.safetensors": {"dup": np.zeros(2, np.float32), "a": np.ones(1, np.uint8)},
         "p2.safetensors": {"dup": np.ones(2, np.float32), "b": np.ones(1, np.uint8)}},
        weight_map={"a": "p1.safetensors", "dup": mapped_to, "b": "p2.safetensors"},
    )  # fmt: skip
    with pytest.raises(FormatError) as info:
        read_hf_index(d)
    assert "dup" in str(info.value)


@pytest.mark.parametrize("index", ['{"weight_map": []}', '{"no_map": {}}', "not json", '["x"]'])
def test_hf_index_unreadable(tmp_path, index):
    d = tmp_path / "hf"
    d.mkdir()
    save_file({"a": np.zeros(2, np.float32)}, d / "p1.safetensors")
    (d / HF_INDEX).write_text(index)
    with pytest.raises(FormatError) as info:
        read_hf_index(d)
    assert HF_INDEX in str(info.value)
