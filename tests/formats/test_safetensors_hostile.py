"""Wrong or hostile safetensors files and Hugging Face index folders: each is a one-line FormatError naming the
file and parameter, or is accepted exactly when the `safetensors` library accepts it (checked here against the
library itself, `safe_open`), except where jaxreshard is deliberately stricter, which each test says.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxreshard.formats import safetensors_io
from jaxreshard.formats.safetensors_io import HF_INDEX, read_hf_index, read_safetensors_index

from ..helpers import one_line_error


def _raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _library_accepts(path: Path) -> bool:
    try:
        with safe_open(path, "np") as f:
            list(f.keys())
        return True
    except SafetensorError:
        return False


def _refused(path: Path, *words: str) -> str:
    return one_line_error(lambda: read_safetensors_index(path), str(path), *words)  # the file is named


# ------------------------------------------------------------------------------- data_offsets tile the data


@pytest.mark.parametrize(
    ("header", "data", "param", "word"),
    [
        ({"a": _entry("U8", [4], [0, 4]), "b": _entry("U8", [4], [8, 12])}, 12, "b", "gap of 4 bytes"),
        ({"a": _entry("U8", [4], [0, 4]), "b": _entry("U8", [4], [2, 6])}, 6, "b", "overlap of 2 bytes"),
        ({"a": _entry("U8", [4], [4, 8])}, 8, "a", "gap of 4 bytes after the start of the data"),
        ({"a": _entry("U8", [4], [0, 4]), "b": _entry("U8", [4], [0, 4])}, 4, "b", "overlap of 4 bytes"),
        ({"c": _entry("U8", [8], [0, 8]), "z": _entry("U8", [0], [4, 4])}, 8, "z", "overlap"),
    ],
    ids=["gap", "overlap", "not-from-0", "same-bytes-twice", "empty-inside-another"],
)
def test_offsets_that_do_not_tile_are_refused_like_the_library_does(tmp_path, header, data, param, word):
    path = _raw(tmp_path / "t.safetensors", header, b"\0" * data)
    assert not _library_accepts(path)
    _refused(path, repr(param), word)


def test_trailing_bytes_after_the_last_tensor_are_refused_like_the_library_does(tmp_path):
    path = _raw(tmp_path / "t.safetensors", {"a": _entry("U8", [4], [0, 4])}, b"\0" * 7)
    assert not _library_accepts(path)
    _refused(path, "3 bytes after the last tensor 'a' belong to no tensor")


def test_bytes_in_a_file_with_no_tensors_are_refused(tmp_path):
    path = _raw(tmp_path / "t.safetensors", {}, b"x")
    assert not _library_accepts(path)
    _refused(path, "1 bytes in a file with no tensors")


def test_empty_tensors_on_the_boundaries_are_accepted_like_the_library_does(tmp_path):
    header = {"e0": _entry("U8", [0], [0, 0]), "a": _entry("U8", [4], [0, 4]), "e1": _entry("F32", [0, 3], [4, 4])}
    path = _raw(tmp_path / "t.safetensors", header, b"\1\2\3\4")
    assert _library_accepts(path)
    entries, _ = read_safetensors_index(path)
    assert {e.param: e.segments for e in entries} == {"e0": ((8 + len(json.dumps(header)), 0),),
                                                      "a": ((8 + len(json.dumps(header)), 4),),
                                                      "e1": ((8 + len(json.dumps(header)) + 4, 0),)}


def test_files_written_by_the_library_are_accepted_unchanged(tmp_path):
    path = tmp_path / "ok.safetensors"
    arrays = {"z": np.arange(3, dtype=np.int64), "a": np.ones((2, 2), np.float16), "m": np.zeros(0, np.uint8)}
    save_file(arrays, path, metadata={"format": "pt"})
    entries, metadata = read_safetensors_index(path)
    assert metadata == {"format": "pt"}
    assert {e.param: e.shape for e in entries} == {k: v.shape for k, v in arrays.items()}


# ------------------------------------------------------------------------------------ fields of one entry


def test_a_dtype_that_is_not_a_string(tmp_path):
    path = _raw(tmp_path / "t.safetensors", {"w": _entry(["F32"], [1], [0, 4])}, b"\0" * 4)  # TypeError before
    _refused(path, "'w'", "unsupported dtype ['F32']")


@pytest.mark.parametrize("shape", [[True, 4], [4, False]])
def test_booleans_are_not_dimensions(tmp_path, shape):
    """JSON `true` is a Python int; the library refuses it as a dimension, so must we."""
    path = _raw(tmp_path / "t.safetensors", {"w": _entry("U8", shape, [0, 4])}, b"\0" * 4)
    assert not _library_accepts(path)
    _refused(path, "'w'", "bad shape")


@pytest.mark.parametrize("raw", [b'{"w": {"dtype": "U8", "shape": [-0], "data_offsets": [0, 0]}}',
                                 b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [-0, 1]}}'])
def test_minus_zero_is_not_a_size_like_the_library_says(tmp_path, raw):
    path = _raw(tmp_path / "t.safetensors", raw, b"\0" if b"[1]" in raw else b"")
    assert not _library_accepts(path)
    _refused(path, "'w'", "bad")


def test_boolean_offsets_are_refused(tmp_path):
    path = _raw(tmp_path / "t.safetensors", {"w": _entry("U8", [1], [False, True])}, b"\0")
    _refused(path, "'w'", "bad data_offsets")


def test_more_than_64_dims_is_refused_though_the_library_accepts_it(tmp_path):
    """Deliberately stricter: numpy cannot hold an array of more than 64 dimensions (NPY_MAXDIMS)."""
    path = _raw(tmp_path / "t.safetensors", {"w": _entry("U8", [1] * 65, [0, 1])}, b"\0")
    assert _library_accepts(path)
    _refused(path, "'w'", "65 dimensions")


@pytest.mark.parametrize("shape", [[1 << 32, 1 << 32, 2], [1 << 63], [10**30, 0]])
def test_absurd_element_counts(tmp_path, shape):
    path = _raw(tmp_path / "t.safetensors", {"w": _entry("U8", shape, [0, 0])})
    _refused(path, "'w'")


def test_a_4300_digit_number(tmp_path):
    raw = b'{"w": {"dtype": "U8", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 1]}}'
    _refused(_raw(tmp_path / "t.safetensors", raw, b"\0"), "not valid JSON")


@pytest.mark.parametrize("name", ["", "a\0b"], ids=["empty", "nul"])
def test_empty_and_nul_names_are_refused_though_the_library_accepts_them(tmp_path, name):
    """Deliberately stricter: such a name cannot be told apart in messages, layouts or a .ckpt output."""
    path = _raw(tmp_path / "t.safetensors", {name: _entry("U8", [4], [0, 4])}, b"\0" * 4)
    assert _library_accepts(path)
    _refused(path, "name")


def test_a_lone_surrogate_name_is_refused(tmp_path):
    path = _raw(tmp_path / "t.safetensors", {"w\ud800": _entry("U8", [4], [0, 4])}, b"\0" * 4)
    assert not _library_accepts(path)
    _refused(path, "lone surrogate")


def test_unknown_fields_in_an_entry_are_ignored_like_the_library_does(tmp_path):
    path = _raw(tmp_path / "t.safetensors", {"w": {**_entry("U8", [4], [0, 4]), "note": [1]}}, b"\0" * 4)
    assert _library_accepts(path)
    assert [e.param for e in read_safetensors_index(path)[0]] == ["w"]


# ------------------------------------------------------------------------------ header as a whole, metadata


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json(tmp_path, depth):
    raw = b'{"__metadata__": ' + b"[" * depth + b"]" * depth + b"}"
    _refused(_raw(tmp_path / "t.safetensors", raw), "corrupt safetensors header")


def test_header_that_is_not_utf8(tmp_path):
    _refused(_raw(tmp_path / "t.safetensors", b'{"\xff": 1}'), "not UTF-8")


@pytest.mark.parametrize("value", [1, None, ["pt"], {"a": "b"}])
def test_non_string_metadata_values_are_refused_like_the_library_does(tmp_path, value):
    path = _raw(tmp_path / "t.safetensors", {"__metadata__": {"format": value}, "w": _entry("U8", [1], [0, 1])}, b"\0")
    assert not _library_accepts(path)
    _refused(path, "__metadata__ 'format'", "not a string")


def test_null_metadata_is_empty_like_the_library_says(tmp_path):
    path = _raw(tmp_path / "t.safetensors", {"__metadata__": None, "w": _entry("U8", [1], [0, 1])}, b"\0")
    assert _library_accepts(path)
    assert read_safetensors_index(path)[1] == {}


def test_leading_and_trailing_whitespace_is_accepted_like_the_library_does(tmp_path):
    path = _raw(tmp_path / "t.safetensors", b' {"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}  ', b"\7")
    assert _library_accepts(path)
    assert [e.shape for e in read_safetensors_index(path)[0]] == [(1,)]


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    _refused(fifo, "FIFO", "only regular files")


# ----------------------------------------------------------------------------------- Hugging Face folders


def _hf(tmp_path: Path, weight_map: dict | None = None, index: bytes | None = None) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    save_file({"a": np.arange(2, dtype=np.float32), "b": np.ones(3, np.int8)},
              folder / "model-00001-of-00002.safetensors")
    save_file({"c": np.ones(1, np.float64)}, folder / "model-00002-of-00002.safetensors")
    if weight_map is None:
        weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                      "c": "model-00002-of-00002.safetensors"}  # fmt: skip
    raw = index if index is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    (folder / HF_INDEX).write_bytes(raw)
    return folder


def _hf_refused(folder: Path, *words: str) -> str:
    return one_line_error(lambda: read_hf_index(folder), *words)


def test_a_correct_folder_reads_in_weight_map_order(tmp_path):
    folder = _hf(tmp_path)
    assert [(e.param, e.path.name) for e in read_hf_index(folder)] == [
        ("a", "model-00001-of-00002.safetensors"), ("b", "model-00001-of-00002.safetensors"),
        ("c", "model-00002-of-00002.safetensors")]  # fmt: skip


@pytest.mark.parametrize(
    "target",
    ["../outside.safetensors", "/tmp/outside.safetensors", "sub/model-00002-of-00002.safetensors", "..", ".",
     "", "a\0b.safetensors", "x\\y.safetensors"],
    ids=["dotdot", "absolute", "separator", "parent", "self", "empty", "nul", "backslash"],
)  # fmt: skip
def test_weight_map_entries_must_be_plain_file_names(tmp_path, target):
    save_file({"c": np.ones(1, np.float64)}, tmp_path / "outside.safetensors")
    folder = _hf(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                            "c": target})  # fmt: skip
    _hf_refused(folder, HF_INDEX, "not a plain file name", "paths stay inside the source")


def test_a_link_out_of_the_folder_is_refused(tmp_path):
    save_file({"c": np.ones(1, np.float64)}, tmp_path / "victim.safetensors")
    folder = _hf(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    (folder / "model-00002-of-00002.safetensors").symlink_to(tmp_path / "victim.safetensors")
    _hf_refused(folder, "is a link to", "victim.safetensors", "paths stay inside the source")


def test_a_link_inside_the_folder_is_read(tmp_path):
    folder = _hf(tmp_path)
    (folder / "real").mkdir()
    (folder / "model-00002-of-00002.safetensors").rename(folder / "real" / "c.safetensors")
    (folder / "model-00002-of-00002.safetensors").symlink_to(folder / "real" / "c.safetensors")
    assert [e.param for e in read_hf_index(folder)] == ["a", "b", "c"]


def test_a_hugging_face_cache_snapshot_links_into_its_own_blobs(tmp_path):
    """huggingface_hub stores `snapshots/<rev>/<file>` as links to `../../blobs/<sha>`: reading a downloaded
    model from the cache must keep working."""
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    built = _hf(tmp_path)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(built.iterdir())):
        f.rename(repo / "blobs" / f"sha{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"sha{i}")
    assert [e.param for e in read_hf_index(snapshot)] == ["a", "b", "c"]


def test_a_tensor_missing_from_weight_map_is_refused_not_dropped(tmp_path):
    folder = _hf(tmp_path, {"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"})
    _hf_refused(folder, "'b'", "missing from weight_map", "dropped")


def test_a_whole_part_missing_from_weight_map_is_refused(tmp_path):
    folder = _hf(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"})
    _hf_refused(folder, "model-00002-of-00002.safetensors is not in weight_map")


def test_other_safetensors_files_beside_the_parts_are_not_parts(tmp_path):
    """A Mistral repository holds `consolidated.safetensors` next to the parts of its index."""
    folder = _hf(tmp_path)
    save_file({"zz": np.ones(1, np.float64)}, folder / "consolidated.safetensors")
    assert [e.param for e in read_hf_index(folder)] == ["a", "b", "c"]


def test_an_empty_weight_map_is_refused(tmp_path):
    _hf_refused(_hf(tmp_path, {}), "'weight_map' is empty")


@pytest.mark.parametrize(
    ("index", "word"),
    [(b"[" * 100_000, "nested too deeply"), (b'{"weight_map": {"a": "\xff"}}', "not UTF-8"),
     (b'{"weight_map": {"a": "x", "a": "y"}}', "appears twice"), (b'{"weight_map": {"a": 1}}', "weight_map")],
    ids=["nested", "not-utf8", "duplicate-key", "not-a-string"],
)  # fmt: skip
def test_malformed_index_json(tmp_path, index, word):
    _hf_refused(_hf(tmp_path, index=index), HF_INDEX, word)


def test_an_oversized_index_is_refused_before_it_is_read(tmp_path, monkeypatch):
    folder = _hf(tmp_path)
    monkeypatch.setattr(safetensors_io, "MAX_INDEX_BYTES", 64)
    _hf_refused(folder, "over the 64-byte limit")


def test_an_index_that_is_a_fifo(tmp_path):
    folder = _hf(tmp_path)
    (folder / HF_INDEX).unlink()
    os.mkfifo(folder / HF_INDEX)
    _hf_refused(folder, "FIFO")
