"""MindSpore `.ckpt` reader/writer against the real MindSpore 2.10 reference files and the protobuf runtime.

Expectations come from outside the module under test: the fixture manifest (sha256 of files written by real
`save_checkpoint`), tools/mindspore_reference.py (parameter list, which slice a rank holds), and an independent decoder
/ encoder built on the protobuf runtime from MindSpore's `checkpoint.proto`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from jaxreshard.box import Box
from jaxreshard.errors import FormatError
from jaxreshard.formats import mindspore_ckpt as mc
from jaxreshard.formats import mindspore_ckpt_write as mw
from jaxreshard.formats.base import FileHandles, aligned_empty, read_box

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "mindspore"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
COMPLETE = ROOT / "ckpt/complete/rank_0/checkpoint_0.ckpt"
CKPT_FILES = sorted(
    rel for rel in MANIFEST["files"] if rel.endswith(".ckpt") and not rel.startswith("strategy/")
    and not (rel.startswith("inconsistent/") and rel.count("/") == 1)  # those are strategy files
)


def _checkpoint_class():
    """MindSpore's `Checkpoint` message (checkpoint.proto) on the protobuf runtime: a codec independent of ours."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="test_checkpoint.proto", syntax="proto2")
    tp = fdp.message_type.add(name="TensorProto")
    tp.field.add(name="dims", number=1, label=F.LABEL_REPEATED, type=F.TYPE_INT64)
    tp.field.add(name="tensor_type", number=2, label=F.LABEL_REQUIRED, type=F.TYPE_STRING)
    tp.field.add(name="tensor_content", number=3, label=F.LABEL_REQUIRED, type=F.TYPE_BYTES)
    mt = fdp.message_type.add(name="MapTensorProto")
    mt.field.add(name="tensor", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE, type_name=".TensorProto")
    ck = fdp.message_type.add(name="Checkpoint")
    value = ck.nested_type.add(name="Value")
    value.oneof_decl.add(name="value")
    value.field.add(name="tag", number=1, label=F.LABEL_REQUIRED, type=F.TYPE_STRING)
    value.field.add(name="tensor", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=".TensorProto",
                    oneof_index=0)
    value.field.add(name="maptensor", number=3, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".MapTensorProto", oneof_index=0)
    ck.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE, type_name=".Checkpoint.Value")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("Checkpoint"))


Checkpoint = _checkpoint_class()


def pb_record(tag: str, dims, tensor_type: str, content: bytes) -> bytes:
    """One record exactly as MindSpore's save_checkpoint serializes it (protobuf runtime)."""
    message = Checkpoint()
    value = message.value.add(tag=tag)
    value.tensor.dims.extend(dims)
    value.tensor.tensor_type = tensor_type
    value.tensor.tensor_content = content
    return message.SerializeToString()


def pb_load(data: bytes) -> dict:
    """`load_checkpoint`'s reading rule on the protobuf runtime: join consecutive same-tag records."""
    message = Checkpoint()
    message.ParseFromString(data[:-17] if data[-17:-10] == b"crc_num" else data)
    out: dict = {}
    previous = None
    for v in message.value:
        t = v.tensor
        if t.tensor_type == "str":
            out[v.tag] = np.frombuffer(t.tensor_content, f"<U{len(t.tensor_content) // 4}")[0]
        elif v.tag == previous:
            out[v.tag] = (out[v.tag][0], out[v.tag][1] + t.tensor_content, list(t.dims))
        else:
            out[v.tag] = (t.tensor_type, t.tensor_content, list(t.dims))
        previous = v.tag
    return out


def read_all(index: mc.CkptIndex) -> dict[str, np.ndarray]:
    with FileHandles() as handles:
        arrays = {}
        for name, entry in index.tensors.items():
            out = aligned_empty(entry.shape, entry.dtype)
            read_box(handles, entry, Box.full(entry.shape), out)
            arrays[name] = out
        return arrays


def rewrite(index: mc.CkptIndex, path: Path, order=None) -> None:
    arrays = read_all(index)
    params = [(n, a.dtype, a.shape) for n, a in arrays.items()]
    with mw.CkptRankWriter(path, params, index.extras, index.names) as writer:
        for name in order or list(arrays):
            writer.write(name, arrays[name])


# --- the complete reference file -------------------------------------------------------------------------------

SPEC_PARAMS = [  # tools/mindspore_reference.py's parameters, in save order
    ("embedding.embedding_table", (64, 16), np.float32), ("layer1.weight", (16, 32), np.float16),
    ("layer1.bias", (32,), np.float32), ("layer2.weight", (32, 16), ml_dtypes.bfloat16),
    ("layer2.bias", (16,), np.float16), ("norm.gamma", (16,), np.float32),
    ("adam_m.layer1.weight", (16, 32), np.float32), ("adam_v.layer1.weight", (16, 32), np.float32),
    ("global_step", (1,), np.int32), ("learning_rate", (), np.float32),
]  # fmt: skip


def test_complete_names_dtypes_shapes():
    index = mc.read_ckpt_index(COMPLETE)
    assert [(n, e.shape, e.dtype) for n, e in index.tensors.items()] == [(n, s, np.dtype(d)) for n, s, d in SPEC_PARAMS]
    assert list(index.names) == MANIFEST["complete_output_param_order"]["dp2mp2"]
    assert index.extras == {} and index.crc is None and index.data_end == COMPLETE.stat().st_size
    st_header = MANIFEST["safetensors_header_complete"]  # MindSpore's own safetensors export of this checkpoint
    for name, entry in index.tensors.items():
        assert list(entry.shape) == st_header[name]["shape"]
        assert len(entry.segments) == 1 and entry.path == COMPLETE


def test_complete_values_match_protobuf_runtime():
    data = COMPLETE.read_bytes()
    expected = pb_load(data)
    arrays = read_all(mc.read_ckpt_index(COMPLETE))
    assert list(arrays) == list(expected)
    for name, (tensor_type, content, _dims) in expected.items():
        assert mc.ckpt_dtype_name(arrays[name].dtype) == tensor_type
        assert arrays[name].tobytes() == content
    assert int(arrays["global_step"][0]) == 1234
    for name, entry in mc.read_ckpt_index(COMPLETE).tensors.items():  # segments point at the raw content
        (offset, nbytes), = entry.segments
        assert data[offset : offset + nbytes] == expected[name][1]


def test_read_box_arbitrary_boxes_complete():
    index = mc.read_ckpt_index(COMPLETE)
    full = read_all(index)
    rng = np.random.default_rng(0)
    with FileHandles() as handles:
        for name, entry in index.tensors.items():
            for _ in range(10):
                lo = [int(rng.integers(0, d)) for d in entry.shape]
                hi = [int(rng.integers(a + 1, d + 1)) for a, d in zip(lo, entry.shape)]
                box = Box(tuple(lo), tuple(hi))
                out = aligned_empty(box.shape, entry.dtype)
                read_box(handles, entry, box, out)
                assert out.tobytes() == full[name][box.to_slices()].tobytes()


def test_dp2mp2_rank_slices_follow_spec_worked_example():
    """dp2mp2 ranks 1,3 hold layer1.weight[:, 16:32]; embedding rows 32*(r%2):+32."""
    full = read_all(mc.read_ckpt_index(COMPLETE))
    for rank in range(4):
        part = read_all(mc.read_ckpt_index(ROOT / f"ckpt/dp2mp2/rank_{rank}/checkpoint_{rank}.ckpt"))
        c = rank % 2
        np.testing.assert_array_equal(part["layer1.weight"], full["layer1.weight"][:, 16 * c : 16 * c + 16])
        table = full["embedding.embedding_table"]
        np.testing.assert_array_equal(part["embedding.embedding_table"], table[32 * c : 32 * c + 32])
        np.testing.assert_array_equal(part["layer2.weight"].view(np.uint16),
                                      full["layer2.weight"][16 * c : 16 * c + 16].view(np.uint16))
        np.testing.assert_array_equal(part["learning_rate"], full["learning_rate"])


@pytest.mark.parametrize("rel", CKPT_FILES)
def test_every_reference_ckpt_rewrites_byte_for_byte(rel, tmp_path):
    src = ROOT / rel
    assert hashlib.sha256(src.read_bytes()).hexdigest() == MANIFEST["files"][rel]["sha256"]
    index = mc.read_ckpt_index(src, verify_crc=True)
    out = tmp_path / "out.ckpt"
    rewrite(index, out, order=list(reversed(index.tensors)))  # any write order gives the same bytes
    assert hashlib.sha256(out.read_bytes()).hexdigest() == MANIFEST["files"][rel]["sha256"]


def test_reference_file_count():
    assert len(CKPT_FILES) == 106  # ckpt/ 79, st/ 1, inconsistent/ 4 sources + 22 outputs


# --- multi-record parameters -----------------------------------------------------------------------------------


def test_multi_record_roundtrip_and_segment_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(mw, "RECORD_CHUNK_BYTES", 100)  # 512 MiB in MindSpore; 100 also splits elements
    rng = np.random.default_rng(1)
    tensors = {
        "a": rng.standard_normal((7, 13)).astype(np.float32),  # 364 B -> 100, 100, 100, 64
        "b": rng.standard_normal((5, 3, 4)).astype(np.float64),  # 480 B -> 5 records
        "small": np.arange(3, dtype=np.int16),
        "bf": rng.standard_normal((9, 11)).astype(ml_dtypes.bfloat16),  # 198 B -> 100, 98
        "flag": np.array(True),
    }
    path = tmp_path / "m.ckpt"
    mw.write_ckpt(path, tensors)
    expected = b""  # what save_checkpoint writes: byte chunks, full dims in every record
    for name, array in tensors.items():
        raw = array.tobytes()
        for start in range(0, len(raw), 100):
            expected += pb_record(name, list(array.shape), mc.ckpt_dtype_name(array.dtype), raw[start : start + 100])
    assert path.read_bytes() == expected
    index = mc.read_ckpt_index(path)
    assert [len(e.segments) for e in index.tensors.values()] == [4, 5, 1, 2, 1]
    assert [n for _, n in index.tensors["a"].segments] == [100, 100, 100, 64]
    assert index.tensors["flag"].shape == ()
    with FileHandles() as handles:
        for name, array in tensors.items():
            entry = index.tensors[name]
            boxes = [Box.full(array.shape)]
            if array.ndim:
                for _ in range(30):
                    lo = [int(rng.integers(0, d)) for d in array.shape]
                    hi = tuple(int(rng.integers(a + 1, d + 1)) for a, d in zip(lo, array.shape))
                    boxes.append(Box(tuple(lo), hi))
            for box in boxes:
                out = aligned_empty(box.shape, entry.dtype)
                read_box(handles, entry, box, out)
                assert out.tobytes() == array[box.to_slices()].tobytes()


def test_large_sparse_two_record_parameter(tmp_path):
    """A 640 MiB fp32 parameter is stored as 536870912 + 134217728 B records (sparse file, no RAM)."""
    n, chunk = 640 * 2**20 // 4, mw.RECORD_CHUNK_BYTES
    h1 = mw._record_header("big", [160, 1048576], "Float32", chunk)
    h2 = mw._record_header("big", [160, 1048576], "Float32", n * 4 - chunk)
    path = tmp_path / "big.ckpt"
    with open(path, "wb") as f:  # only headers and three marked floats are real
        f.write(h1)
        f.seek(len(h1) + chunk - 4)
        f.write(struct.pack("<f", 1.5) + h2 + struct.pack("<f", 2.5))  # last of record 1, first of record 2
        f.seek(len(h1) + chunk + len(h2) + n * 4 - chunk)
        f.write(pb_record("global_step", [1], "Int32", b"\x07\0\0\0"))
    index = mc.read_ckpt_index(path)
    entry = index.tensors["big"]
    assert entry.segments == ((len(h1), chunk), (len(h1) + chunk + len(h2), n * 4 - chunk))
    assert index.names == ("big", "global_step")
    row, col = divmod(chunk // 4 - 1, 1048576)
    out = aligned_empty((1, 3), np.float32)
    with FileHandles() as handles:
        read_box(handles, entry, Box((row, col), (row + 1, col + 3)), out)
        assert out.tolist() == [[1.5, 2.5, 0.0]]
        step = aligned_empty((1,), np.int32)
        read_box(handles, index.tensors["global_step"], Box.full((1,)), step)
    assert step.tolist() == [7]


def test_record_header_equals_protobuf_runtime():
    for dims, tt, size in [([], "Float32", 4), ([2, 3], "Float16", 12), ([160, 1048576], "Float32", 300),
                           ([0], "str", 8), ([2**40], "Int8", 1000)]:
        assert mw._record_header("name.x", dims, tt, size) + b"\0" * size == pb_record("name.x", dims, tt, b"\0" * size)


# --- trailer, extras, scalars ----------------------------------------------------------------------------------


def test_crc_trailer(tmp_path):
    path = tmp_path / "c.ckpt"
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "lr": np.float32(0.5), "note": "hi"}
    mw.write_ckpt(path, tensors, crc=True)
    data = path.read_bytes()
    body = data[:-17]
    assert data[-17:] == b"crc_num" + zlib.crc32(body).to_bytes(10, "big")
    plain = tmp_path / "p.ckpt"
    mw.write_ckpt(plain, tensors)
    assert plain.read_bytes() == body
    index = mc.read_ckpt_index(path, verify_crc=True)
    assert index.crc == zlib.crc32(body) and index.data_end == len(body)
    np.testing.assert_array_equal(read_all(index)["w"], tensors["w"])
    assert index.extras == {"note": "hi"}
    entry = index.tensors["w"]
    flipped = bytearray(data)
    flipped[entry.segments[0][0] + 5] ^= 0x40
    path.write_bytes(bytes(flipped))
    with pytest.raises(FormatError, match="CRC mismatch"):
        mc.read_ckpt_index(path, verify_crc=True)
    assert mc.read_ckpt_index(path).crc == zlib.crc32(body)  # without the check the trailer is only stripped


def test_str_extras_roundtrip(tmp_path):
    path = tmp_path / "s.ckpt"
    w = np.ones((2, 2), np.float16)
    mw.write_ckpt(path, {"w": w, "tag": "héllo 😀", "empty": "", "step": 7, "lr": 0.25, "ok": True, "z": np.int8(3)})
    index = mc.read_ckpt_index(path)
    assert index.names == ("w", "tag", "empty", "step", "lr", "ok", "z")
    assert dict(index.extras) == {"tag": "héllo 😀", "empty": ""}
    assert list(index.tensors) == ["w", "step", "lr", "ok", "z"]
    assert [(e.dtype, e.shape) for e in index.tensors.values()] == [
        (np.dtype(np.float16), (2, 2)), (np.dtype(np.int64), ()), (np.dtype(np.float32), ()),
        (np.dtype(bool), ()), (np.dtype(np.int8), ())]  # fmt: skip
    message = Checkpoint()
    message.ParseFromString(path.read_bytes())
    records = {v.tag: v.tensor for v in message.value}
    assert list(records["tag"].dims) == [0] and records["tag"].tensor_type == "str"
    assert records["tag"].tensor_content == np.array("héllo 😀").tobytes()
    assert records["empty"].tensor_content == np.array("").tobytes()  # numpy stores '' as one NUL character
    assert list(records["step"].dims) == [] and records["step"].tensor_type == "Int64"
    assert pb_load(path.read_bytes())["tag"] == "héllo 😀"
    arrays = read_all(index)
    assert arrays["step"].item() == 7 and arrays["lr"].item() == 0.25 and arrays["ok"].item() is True


def test_dims_zero_is_scalar_and_zero_length_is_refused(tmp_path):
    path = tmp_path / "d.ckpt"
    path.write_bytes(pb_record("s", [0], "Float32", struct.pack("<f", 3.0)) + pb_record("n", [], "Int32", b"\1\0\0\0"))
    index = mc.read_ckpt_index(path)
    assert index.tensors["s"].shape == () and index.tensors["n"].shape == ()
    assert read_all(index)["s"].item() == 3.0
    with pytest.raises(ValueError, match="cannot hold"):
        mw.CkptRankWriter(tmp_path / "e.ckpt", [("x", np.float32, (0,))])
    mw.write_ckpt(tmp_path / "f.ckpt", {"x": np.zeros((0, 3), np.float32), "y": np.float32(1)})  # still representable
    assert mc.read_ckpt_index(tmp_path / "f.ckpt").tensors["x"].shape == (0, 3)


def test_repeated_tag_later_wins_at_first_position(tmp_path):
    path = tmp_path / "r.ckpt"
    path.write_bytes(pb_record("a", [1], "Int32", b"\1\0\0\0") + pb_record("b", [1], "Int32", b"\2\0\0\0")
                     + pb_record("a", [2], "Int8", b"\3\4"))
    index = mc.read_ckpt_index(path)
    assert index.names == ("a", "b")
    assert read_all(index)["a"].tolist() == [3, 4]


def test_dtype_names():
    names = ["Float16", "Float32", "Float64", "BFloat16", "Int8", "Int16", "Int32", "Int64",
             "UInt8", "UInt16", "UInt32", "UInt64", "Bool"]
    dtypes = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16, np.int8, np.int16, np.int32, np.int64,
              np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]
    for name, dtype in zip(names, dtypes, strict=True):
        assert mc.ckpt_dtype_name(np.dtype(dtype)) == name and mc.ckpt_dtype(name) == np.dtype(dtype)
    for bad in (np.complex64, np.dtype(">f4"), ml_dtypes.float8_e4m3fn):
        with pytest.raises(ValueError):
            mc.ckpt_dtype_name(bad)
    with pytest.raises(ValueError, match="Int4"):
        mc.ckpt_dtype("Int4")


# --- writer contract -------------------------------------------------------------------------------------------


def test_writer_rejects_bad_arrays_and_incomplete_files(tmp_path):
    path = tmp_path / "w.ckpt"
    writer = mw.CkptRankWriter(path, [("a", np.float32, (2, 3)), ("b", np.int8, (4,))])
    for bad in (np.zeros((2, 3), np.float64), np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32).T,
                [[0.0] * 3] * 2):
        with pytest.raises(ValueError):
            writer.write("a", bad)
    with pytest.raises(ValueError, match="not declared"):
        writer.write("c", np.zeros(1, np.float32))
    writer.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="already written"):
        writer.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="'b'"):
        writer.close()
    one = [("a", np.float32, ())]
    for params, extras, order in [(one * 2, None, None), (one, {"a": "x"}, None), (one, {"e": "x"}, ["a"]),
                                  (one, None, ["a", "a"]), (one, None, ["b"])]:
        with pytest.raises(ValueError):
            mw.CkptRankWriter(tmp_path / "x.ckpt", params, extras, order)


def test_writer_streams_in_any_order_with_extras_in_place(tmp_path):
    arrays = {"x": np.arange(5, dtype=np.int64), "y": np.full((2, 2), 7, np.uint8)}
    order = ["y", "meta", "x"]
    paths = []
    for i, write_order in enumerate((["x", "y"], ["y", "x"])):
        paths.append(tmp_path / f"o{i}.ckpt")
        params = [(n, a.dtype, a.shape) for n, a in arrays.items()]
        with mw.CkptRankWriter(paths[-1], params, {"meta": "m"}, order) as w:
            for name in write_order:
                w.write(name, arrays[name])
    assert paths[0].read_bytes() == paths[1].read_bytes() == (
        pb_record("y", [2, 2], "UInt8", arrays["y"].tobytes()) + pb_record("meta", [0], "str", "m".encode("utf-32-le"))
        + pb_record("x", [5], "Int64", arrays["x"].tobytes()))


# --- bad files -------------------------------------------------------------------------------------------------


def _expect(path: Path, data: bytes, *patterns: str) -> None:
    path.write_bytes(data)
    with pytest.raises(FormatError) as info:
        mc.read_ckpt_index(path)
    assert str(path) in str(info.value)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)


def test_truncated_files(tmp_path):
    data = COMPLETE.read_bytes()
    for cut in (len(data) - 1, len(data) - 3, 4150, 4142, 60, 3):
        _expect(tmp_path / f"t{cut}.ckpt", data[:cut], "record")
    _expect(tmp_path / "t.ckpt", data[:-1], "record 9", "'learning_rate'", "truncated")  # the 10th record
    _expect(tmp_path / "e.ckpt", b"", "empty")
    with pytest.raises(FormatError, match="cannot open"):
        mc.read_ckpt_index(tmp_path / "missing.ckpt")


def test_lengths_past_eof_and_garbage(tmp_path):
    good = pb_record("w", [2], "Float32", b"\0" * 8)
    _expect(tmp_path / "a.ckpt", b"\x0a\xff\xff\xff\x7f" + good[2:], "record 0", "claims")
    _expect(tmp_path / "b.ckpt", good + b"\x0a\x50" + good[2:], "record 1", "claims")
    _expect(tmp_path / "c.ckpt", b"this is not a checkpoint at all", "not a MindSpore checkpoint")
    _expect(tmp_path / "d.ckpt", good + b"\x12\x03abc", "record 1", "0x12")
    inner = good.replace(b"\x1a\x08", b"\x1a\x09")  # content length one past its message
    _expect(tmp_path / "e.ckpt", inner, "record 0", "'w'")
    _expect(tmp_path / "f.ckpt", pb_record("w", [3], "Float32", b"\0" * 8), "'w'", "holds 8 bytes", "need 12")
    _expect(tmp_path / "g.ckpt", pb_record("w", [2], "Float32", b"\0" * 4) + pb_record("w", [3], "Float32", b"\0" * 4),
            "'w'", "disagree")
    _expect(tmp_path / "h.ckpt", pb_record("w", [-2], "Float32", b""), "negative")


def test_encrypted_files_are_refused(tmp_path):
    for magic in mc.ENCRYPTED_MAGICS:
        _expect(tmp_path / f"{magic:x}.ckpt", struct.pack("<I", magic) + os.urandom(64), "encrypted", "decrypt")


def test_int4_and_maptensor_are_unsupported(tmp_path):
    _expect(tmp_path / "i.ckpt", pb_record("ok", [1], "Int8", b"\1") + pb_record("q.weight", [4], "Int4", b"\0\0"),
            "'q.weight'", "Int4", "unsupported")
    message = Checkpoint()
    value = message.value.add(tag="table")
    for dims, tt, content in (([2], "int32", b"\0" * 8), ([2, 2], "float32", b"\0" * 16), ([2], "int32", b"\0" * 8)):
        t = value.maptensor.tensor.add(tensor_type=tt, tensor_content=content)
        t.dims.extend(dims)
    _expect(tmp_path / "m.ckpt", message.SerializeToString(), "'table'", "MapTensor", "unsupported")
    _expect(tmp_path / "u.ckpt", pb_record("c", [1], "Complex64", b"\0" * 8), "'c'", "Complex64")


def test_more_dims_than_any_array_can_have(tmp_path):
    _expect(tmp_path / "d.ckpt", pb_record("w", [1] * 65, "Int8", b"\1"), "'w'", "65 dims", "64")


@pytest.mark.parametrize(("tag", "word"), [("", "empty name"), ("a\0b", "NUL")], ids=["empty", "nul"])
def test_tags_that_cannot_name_a_parameter(tmp_path, tag, word):
    _expect(tmp_path / "t.ckpt", pb_record(tag, [1], "Int8", b"\1"), "record 0", word)


def test_huge_dims_never_allocate(tmp_path):
    _expect(tmp_path / "h.ckpt", pb_record("w", [1 << 40, 1 << 40], "Float32", b"\0" * 8), "'w'", "holds 8 bytes")


def test_a_fifo_is_refused_at_once_never_opened_to_block(tmp_path):
    os.mkfifo(tmp_path / "pipe.ckpt")
    with pytest.raises(FormatError, match="FIFO.*only regular files"):
        mc.read_ckpt_index(tmp_path / "pipe.ckpt")


def test_a_file_in_no_checkpoint_format_says_so_distinctly(tmp_path):
    """`inspect` tries a strategy only for NotACheckpoint, so a truncated checkpoint is reported as truncated."""
    from jaxreshard.formats.untrusted import NotACheckpoint

    (tmp_path / "n.ckpt").write_bytes(b"\x08\x01 a strategy file starts with field 1 as a varint")
    with pytest.raises(NotACheckpoint, match="not a MindSpore checkpoint"):
        mc.read_ckpt_index(tmp_path / "n.ckpt")
    (tmp_path / "t.ckpt").write_bytes(COMPLETE.read_bytes()[:4150])
    with pytest.raises(FormatError, match="truncated") as info:
        mc.read_ckpt_index(tmp_path / "t.ckpt")
    assert not isinstance(info.value, NotACheckpoint)


def test_optimizer_prefixes_match_the_states_mindspore_saves():
    """One definition, two uses: the bare prefixes transform_checkpoints tests, and "<prefix>." which begins every
    optimizer state MindSpore saved in the reference fixture (a state of each trainable weight, named after it)."""
    assert mc.OPTIMIZER_PREFIXES == ("adam_m", "adam_v", "accu_grads")
    assert mc.OPTIMIZER_STATE_PREFIXES == ("adam_m.", "adam_v.", "accu_grads.")
    names = mc.read_ckpt_index(ROOT / "ckpt" / "complete" / "rank_0" / "checkpoint_0.ckpt").names
    states = [n for n in names if n.startswith(mc.OPTIMIZER_STATE_PREFIXES)]
    assert states == ["adam_m.layer1.weight", "adam_v.layer1.weight"]
    assert all(n.split(".", 1)[1] in names for n in states)  # each names a weight of the same file
    assert [n for n in names if n.startswith(mc.OPTIMIZER_PREFIXES)] == states
    assert not "adam_mean.w".startswith(mc.OPTIMIZER_STATE_PREFIXES) and "adam_mean.w".startswith(mc.OPTIMIZER_PREFIXES)
