"""Bad-input corpus for reading source checkpoints that are wrong or hostile (issue 9, "formats" slice):
safetensors headers, Hugging Face index folders, source discovery (rank folders, non-regular files), MindSpore
`.ckpt` records, and `inspect` of damaged checkpoints and orbax folders."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..wire import field as _field
from .harness import Case, corpus_test

FIXTURE_CKPT = Path(__file__).resolve().parents[1] / "fixtures/mindspore/ckpt/complete/rank_0/checkpoint_0.ckpt"
PART1, PART2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _convert(src: str) -> list[str]:
    return ["convert", "--src", src, "--dst", "{tmp}/out", "-q"]


# --------------------------------------------------------------------------------------------- safetensors


def _st_bytes(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(dtype: object, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _st(header: dict | bytes, data: bytes = b""):
    def setup(tmp: Path) -> None:
        (tmp / "m.safetensors").write_bytes(_st_bytes(header, data))

    return setup


ST = _convert("{tmp}/m.safetensors")
U8_4 = _entry("U8", [4], [0, 4])

SAFETENSORS = [
    Case("st-offsets-gap", ST, 2, r"m\.safetensors: parameter 'b': .*gap of 4 bytes",
         _st({"a": U8_4, "b": _entry("U8", [4], [8, 12])}, b"\0" * 12)),
    Case("st-offsets-overlap", ST, 2, r"parameter 'b': .*overlap of 2 bytes after the end of 'a'",
         _st({"a": U8_4, "b": _entry("U8", [4], [2, 6])}, b"\0" * 6)),
    Case("st-offsets-not-from-0", ST, 2, r"parameter 'a': data_offsets \[4, 8\] leave a gap",
         _st({"a": _entry("U8", [4], [4, 8])}, b"\0" * 8)),
    Case("st-trailing-garbage", ST, 2, r"5 bytes after the last tensor 'a' belong to no tensor",
         _st({"a": U8_4}, b"\0" * 9)),
    Case("st-65-dims", ST, 2, r"parameter 'w': shape has 65 dimensions",
         _st({"w": _entry("U8", [1] * 65, [0, 1])}, b"\0")),
    Case("st-absurd-element-count", ST, 2, r"parameter 'w': shape .* absurd element count",
         _st({"w": _entry("U8", [1 << 32, 1 << 32, 4], [0, 0])})),
    Case("st-dtype-is-a-list", ST, 2, r"parameter 'w': unsupported dtype \['F32'\]",
         _st({"w": _entry(["F32"], [1], [0, 4])}, b"\0" * 4)),
    Case("st-shape-of-booleans", ST, 2, r"parameter 'w': bad shape \[true|True",
         _st({"w": _entry("U8", [True], [0, 1])}, b"\0")),
    Case("st-name-with-nul", ST, 2, r"parameter 'a\\x00b' has a NUL character", _st({"a\0b": U8_4}, b"\0" * 4)),
    Case("st-empty-name", ST, 2, r"a tensor has an empty name", _st({"": U8_4}, b"\0" * 4)),
    Case("st-lone-surrogate-name", ST, 2, r"lone surrogate", _st({"w\ud800": U8_4}, b"\0" * 4)),
    Case("st-deeply-nested-json", ST, 2, r"corrupt safetensors header: JSON nested too deeply",
         _st(b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
    Case("st-header-not-utf8", ST, 2, r"corrupt safetensors header: not UTF-8", _st(b'{"\xff\xfe": 1}')),
    Case("st-metadata-not-a-string", ST, 2, r"__metadata__ 'format' is int 1, not a string",
         _st({"__metadata__": {"format": 1}, "a": U8_4}, b"\0" * 4)),
    Case("st-4300-digit-number", ST, 2, r"not valid JSON .*digits",
         _st(b'{"w": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 1]}}', b"\0")),
]


# ------------------------------------------------------------------------------------------ Hugging Face


def _hf(weight_map: dict | None = None, *, index: bytes | None = None, extra=None):
    """`{tmp}/hf` with two parts (a, b | c) and an index; `extra(tmp)` adds hostile files."""

    def setup(tmp: Path) -> None:
        folder = tmp / "hf"
        folder.mkdir()
        (folder / PART1).write_bytes(_st_bytes({"a": U8_4, "b": _entry("U8", [2], [4, 6])}, b"\1" * 6))
        (folder / PART2).write_bytes(_st_bytes({"c": U8_4}, b"\2" * 4))
        (tmp / "victim.safetensors").write_bytes(_st_bytes({"c": U8_4}, b"secr"))
        wm = weight_map if weight_map is not None else {"a": PART1, "b": PART1, "c": PART2}
        (folder / "model.safetensors.index.json").write_bytes(index or json.dumps({"weight_map": wm}).encode())
        if extra is not None:
            extra(tmp)

    return setup


def _link_part_out(tmp: Path) -> None:
    (tmp / "hf" / PART2).unlink()
    (tmp / "hf" / PART2).symlink_to(tmp / "victim.safetensors")


HF = _convert("{tmp}/hf")
HUGGING_FACE = [
    Case("hf-entry-dotdot", HF, 2, r"weight_map names '\.\./victim\.safetensors', not a plain file name.*paths stay "
         r"inside the source", _hf({"a": PART1, "b": PART1, "c": "../victim.safetensors"})),
    Case("hf-entry-absolute", HF, 2, r"weight_map names '/.*victim\.safetensors', not a plain file name",
         lambda tmp: _hf({"a": PART1, "b": PART1, "c": str(tmp / "victim.safetensors")})(tmp)),
    Case("hf-entry-nul", HF, 2, r"weight_map names 'p\\x00\.safetensors', not a plain file name",
         _hf({"a": PART1, "b": PART1, "c": "p\0.safetensors"})),
    Case("hf-entry-separator", HF, 2, r"weight_map names 'sub/x\.safetensors'", _hf({"a": PART1, "b": PART1,
                                                                                      "c": "sub/x.safetensors"})),
    Case("hf-part-links-outside", HF, 2, r"weight_map file 'model-00002-of-00002\.safetensors' is a link to .*victim"
         r"\.safetensors, outside .*paths stay inside the source", _hf(extra=_link_part_out)),
    Case("hf-tensor-missing-from-weight-map", HF, 2, r"parameter 'b' of model-00001-of-00002\.safetensors is missing "
         r"from weight_map, so it would be dropped", _hf({"a": PART1, "c": PART2})),
    Case("hf-part-missing-from-weight-map", HF, 2, r"part file model-00002-of-00002\.safetensors is not in weight_map",
         _hf({"a": PART1, "b": PART1})),
    Case("hf-empty-weight-map", HF, 2, r"'weight_map' is empty, so the checkpoint would be empty", _hf({})),
    Case("hf-weight-map-lists-a-ghost", HF, 2, r"parameters listed but absent from their files: \['ghost'\]",
         _hf({"a": PART1, "b": PART1, "c": PART2, "ghost": PART2})),
    Case("hf-index-deeply-nested", HF, 2, r"index\.json: corrupt Hugging Face index: JSON nested too deeply",
         _hf(index=b"[" * 100_000)),
    Case("hf-index-not-utf8", HF, 2, r"index\.json: corrupt Hugging Face index: not UTF-8",
         _hf(index=b'{"weight_map": {"a": "\xff"}}')),
    Case("hf-index-duplicate-parameter", HF, 2, r"key 'a' appears twice",
         _hf(index=json.dumps({"weight_map": {"a": PART1}})[:-2].encode() + b', "a": "x"}}')),
]


# ------------------------------------------------------------------------------------------ source discovery


def _ranks(*names: str):
    def setup(tmp: Path) -> None:
        for name in names:
            (tmp / "src" / name).mkdir(parents=True)
            (tmp / "src" / name / "model.safetensors").write_bytes(_st_bytes({"w": U8_4}, b"\0" * 4))

    return setup


def _fifo(rel: str):
    def setup(tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(tmp / rel)

    return setup


def _fifo_in_rank(tmp: Path) -> None:
    _ranks("rank_0")(tmp)
    os.mkfifo(tmp / "src" / "rank_0" / "zz.safetensors")


DISCOVERY = [
    Case("rank-00-aliases-rank-0", _convert("{tmp}/src"), 2, r"src: rank folder\(s\) \['rank_00'\] are not named "
         r"rank_<n> with ASCII digits and no leading zeros", _ranks("rank_0", "rank_1", "rank_00")),
    Case("rank-non-ascii-digit", _convert("{tmp}/src"), 2, r"rank folder\(s\) \['rank_\u0661'\] are not named rank_<n>",
         _ranks("rank_0", "rank_1", "rank_\u0661")),
    Case("src-dev-null", _convert("/dev/null"), 2, r"/dev/null: the source is a character device"),
    Case("src-is-a-fifo", _convert("{tmp}/pipe.safetensors"), 2, r"pipe\.safetensors: the source is a FIFO",
         _fifo("pipe.safetensors")),
    Case("fifo-in-a-rank-folder", _convert("{tmp}/src"), 2, r"rank_0/zz\.safetensors: is a FIFO \(named pipe\); only "
         r"regular files are read", _fifo_in_rank),
    Case("hf-index-is-a-fifo", HF, 2, r"index\.json: the Hugging Face index is a FIFO",
         _hf(extra=lambda tmp: ((tmp / "hf/model.safetensors.index.json").unlink(),
                                os.mkfifo(tmp / "hf/model.safetensors.index.json")))),
    Case("inspect-dev-null", ["inspect", "/dev/null"], 2, r"/dev/null: the source is a character device"),
    Case("unify-file-suffix-rank-alias", ["unify", "--src", "{tmp}/src", "--dst", "{tmp}/out", "--file-suffix", "model",
                                          "--src-layout", "configs/layouts/llama_dp8.yaml"], 2,
         r"src: rank folder\(s\) \['rank_01'\] are not named rank_<n>", _ranks("rank_0", "rank_1", "rank_01")),
]


# ------------------------------------------------------------------------------------------------ .ckpt


def _record(tag: str, dims: list[int], kind: str, content: bytes) -> bytes:
    tensor = b"".join(_field(1, d) for d in dims) + _field(2, kind.encode()) + _field(3, content)
    return _field(1, _field(1, tag.encode()) + _field(2, tensor))


def _ckpt(data: bytes | None = None, cut: int | None = None):
    def setup(tmp: Path) -> None:
        raw = FIXTURE_CKPT.read_bytes()[:cut] if data is None else data
        (tmp / "m.ckpt").write_bytes(raw)

    return setup


CK = _convert("{tmp}/m.ckpt")
GOOD = _record("ok", [1], "Int8", b"\1")
CKPT = [
    Case("ckpt-truncated-record", CK, 2, r"m\.ckpt: record 1 at byte 4145 .*is corrupt: "
         r".*truncated", _ckpt(cut=4150)),
    Case("ckpt-truncated-varint", CK, 2, r"m\.ckpt: record 1 .* varint .* runs past the end",
         _ckpt(GOOD + b"\x0a\xff\xff")),
    Case("ckpt-length-beyond-the-file", CK, 2, r"record 1 .* claims 2097151 bytes",
         _ckpt(GOOD + b"\x0a\xff\xff\x7f" + b"\0" * 8)),
    Case("ckpt-65-dims", CK, 2, r"parameter 'w'.*65 dims, more than the 64",
         _ckpt(_record("w", [1] * 65, "Int8", b"\1"))),
    Case("ckpt-absurd-dims", CK, 2, r"parameter 'w' holds 8 bytes but its dims \[1099511627776, 1099511627776\]",
         _ckpt(_record("w", [1 << 40, 1 << 40], "Float32", b"\0" * 8))),
    Case("ckpt-unknown-tensor-type", CK, 2, r"parameter 'w' has tensor_type 'Complex128' \(an unknown tensor_type\)",
         _ckpt(_record("w", [1], "Complex128", b"\0" * 16))),
    Case("ckpt-empty-tag", CK, 2, r"m\.ckpt: record 0 at byte 0: a tensor has an empty name",
         _ckpt(_record("", [1], "Int8", b"\1"))),
    Case("ckpt-fifo", CK, 2, r"m\.ckpt: the source is a FIFO", _fifo("m.ckpt")),
]


# ---------------------------------------------------------------------------------------------- inspect


def _orbax(tmp: Path) -> None:
    from jaxreshard.cli import main

    (tmp / "st").mkdir()
    (tmp / "st" / "m.safetensors").write_bytes(_st_bytes({"a": _entry("F32", [2], [0, 8])}, b"\0" * 8))
    assert main(["convert", "--src", str(tmp / "st"), "--dst", str(tmp / "orb"), "--output-format", "orbax", "-q"]) == 0


INSPECT = [
    Case("inspect-truncated-ckpt", ["inspect", "{tmp}/m.ckpt"], 2, r"m\.ckpt: record 1 .* is corrupt: .*truncated",
         _ckpt(cut=4150)),
    Case("inspect-truncated-safetensors", ["inspect", "{tmp}/m.safetensors"], 2,
         r"m\.safetensors: parameter 'a': data ends at byte \d+ but the file has \d+; the file is truncated",
         _st({"a": _entry("U8", [8], [0, 8])}, b"\0" * 3)),
    Case("inspect-orbax-folder-lists-arrays", ["inspect", "{tmp}/orb"], 0, "", _orbax),
    Case("inspect-orbax-folder-with-a-layout",
         ["inspect", "{tmp}/orb", "--src-layout", "configs/layouts/llama_dp8.yaml"],
         2, r"orb: an orbax checkpoint holds whole arrays; it takes no source layout", _orbax),
]

CASES = [*SAFETENSORS, *HUGGING_FACE, *DISCOVERY, *CKPT, *INSPECT]

test_case = corpus_test(CASES)
