"""The manifest format: round trip, validation of what is read, streaming hashes equal hashlib's."""

from __future__ import annotations

import hashlib
import json

import pytest

from jaxreshard.errors import FormatError
from jaxreshard.formats.manifest import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    ParamRecord,
    StreamingHash,
    file_sha256,
    read_manifest,
    write_manifest,
)  # fmt: skip


def _manifest() -> Manifest:
    return Manifest(
        num_ranks=8,
        params={"w": ParamRecord((16, 8), "BF16", (("dp", 2), ("mp", 4)), (("mp",), ()), (0,)),
                "step": ParamRecord((), "I64")},
        files={"rank_0/checkpoint_0.safetensors": FileRecord(123, "ab" * 32)},
        output_format="safetensors", source="/src",
    )  # fmt: skip


def test_round_trip(tmp_path):
    m = _manifest()
    write_manifest(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back.params == m.params and back.files == m.files and back.num_ranks == 8
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert raw["format"] == "jaxreshard.manifest" and raw["params"]["w"]["spec"] == [["mp"], []]
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]  # no temporary left


def test_absent_is_none(tmp_path):
    assert read_manifest(tmp_path) is None


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(format="other"),
    lambda d: d.update(version=2),
    lambda d: d.update(num_ranks=0),
    lambda d: d["params"]["w"].update(shape=[-1, 8]),
    lambda d: d["params"]["w"].update(mesh=[["dp", True]]),
    lambda d: d.update(files={"../x": {"size": 1, "sha256": "00"}}),
    lambda d: d.update(files={"/etc/passwd": {"size": 1, "sha256": "00"}}),
    lambda d: d.pop("params"),
])  # fmt: skip
def test_damaged_manifests_are_refused(tmp_path, mutate):
    data = _manifest().to_json()
    mutate(data)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(FormatError, match="manifest"):
        read_manifest(tmp_path)


def test_not_json(tmp_path):
    (tmp_path / MANIFEST_NAME).write_bytes(b"\xff[[[")
    with pytest.raises(FormatError, match="damaged jaxreshard manifest"):
        read_manifest(tmp_path)


def test_streaming_hash_in_order_and_out_of_order(tmp_path):
    data = bytes(range(256)) * 1000
    path = tmp_path / "f"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    h = StreamingHash()
    h.update(0, data[:1000])
    h.update(1000, memoryview(data[1000:]))
    assert h.digest(path, len(data)) == want
    h = StreamingHash()
    h.update(1000, data[1000:])  # out of order: falls back to hashing the file
    h.update(0, data[:1000])
    assert h.digest(path, len(data)) == want == file_sha256(path)


def test_a_manifest_of_too_many_objects_is_refused_before_parsing(tmp_path, monkeypatch):
    """`{}` costs Python ~64 bytes for 3 bytes of file: a wide manifest within the byte cap took GBs."""
    from jaxreshard.formats import untrusted

    data = _manifest().to_json()
    data["extra"] = {"pad": [{}] * 1000}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(tmp_path).num_ranks == 8  # within the cap: read as before
    monkeypatch.setattr(untrusted, "MAX_JSON_CONTAINERS", 1000)
    message = r"MANIFEST: corrupt jaxreshard manifest: 10\d\d JSON objects and arrays, over the cap of 1000"
    with pytest.raises(FormatError, match=message.replace("MANIFEST", MANIFEST_NAME.replace(".", r"\."))):
        read_manifest(tmp_path)
