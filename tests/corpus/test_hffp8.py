"""Bad inputs of Hugging Face folders (companion files) and FP8 checkpoints (dtypes, block scales, --dequantize)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from .harness import Case, corpus_test

F8 = np.dtype(ml_dtypes.float8_e4m3fn)


def _st(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _tensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    header, offset, blobs = {}, 0, []
    for name, (code, array) in tensors.items():
        data = array.tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    _st(path, header, b"".join(blobs))


def _fp8_model(rows: int = 256, cols: int = 256, scale_shape: tuple[int, ...] | None = None, config: str | None = None,
               bare: bool = False):  # fmt: skip
    def setup(tmp: Path) -> None:
        w = np.zeros((rows, cols), F8)
        s = np.ones(scale_shape or (-(-rows // 128), -(-cols // 128)), np.float32)
        tensors = {"w": ("F8_E4M3", w), "w_scale_inv": ("F32", s)}
        if bare:
            tensors["other"] = ("F8_E5M2", np.zeros((4, 4), np.uint8))
        _tensors(tmp / "src/model.safetensors", tensors)
        if config is not None:
            (tmp / "src/config.json").write_text(config)
        (tmp / "rows2.yaml").write_text("mesh: {mp: 2}\nparams:\n  - {match: w, spec: [mp, null]}\n")
        (tmp / "cols4.yaml").write_text("mesh: {mp: 4}\nparams:\n  - {match: w, spec: [null, mp]}\n")

    return setup


def _dtype(code: str, nbytes: int = 8):
    def setup(tmp: Path) -> None:
        _st(tmp / "src/model.safetensors", {"x": {"dtype": code, "shape": [4, 4], "data_offsets": [0, nbytes]}},
            bytes(nbytes))

    return setup


def _hf_with(extra) -> callable:
    """A one-file model folder with a config.json, plus whatever `extra(folder)` adds."""
    def setup(tmp: Path) -> None:
        _tensors(tmp / "src/model.safetensors", {"w": ("F32", np.zeros((4, 4), np.float32))})
        (tmp / "src/config.json").write_text("{}")
        extra(tmp / "src")

    return setup


def _link_out(folder: Path) -> None:
    (folder.parent / "elsewhere.txt").write_text("secret")
    os.symlink(folder.parent / "elsewhere.txt", folder / "tokenizer.model")


def _dangling(folder: Path) -> None:
    os.symlink(folder / "gone.json", folder / "tokenizer_config.json")


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "special_tokens_map.json")


def _huge(folder: Path) -> None:
    with open(folder / "tokenizer.json", "wb") as f:
        f.truncate((1 << 30) + 1)  # sparse: no disk used


def _huge_config(folder: Path) -> None:
    _fp8_model()(folder.parent)
    with open(folder / "config.json", "wb") as f:
        f.truncate((16 << 20) + 1)


def _many(folder: Path) -> None:
    for i in range(1001):
        (folder / f"note{i}.txt").write_text("")


CONVERT = ["convert", "--src", "{tmp}/src", "--dst", "{tmp}/out"]
CASES = [
    Case("fp8-packed-f4", CONVERT, 2, r"parameter 'x': dtype F4 packs several values per byte", _dtype("F4")),
    Case("fp8-packed-f6", CONVERT, 2, r"dtype F6_E3M2 packs several values per byte", _dtype("F6_E3M2", 12)),
    Case("fp8-unknown-f8", CONVERT, 2, r"unsupported dtype 'F8_E3M4'", _dtype("F8_E3M4", 16)),
    Case("fp8-offsets-not-one-byte", CONVERT, 2, r"data_offsets \[0, 32\] do not hold 16 bytes for shape \[4, 4\]",
         _dtype("F8_E4M3", 32)),
    Case("fp8-scale-cut-rows", [*CONVERT, "--dst-layout", "{tmp}/rows2.yaml"], 2,
         r"parameter 'w': the destination spec \[mp, null\] cuts dim 0 \(384\) 2 ways, not at a multiple of its "
         r"128-wide scale blocks \('w_scale_inv'\)", _fp8_model(rows=384)),
    Case("fp8-scale-cut-cols", [*CONVERT, "--dst-layout", "{tmp}/cols4.yaml"], 2,
         r"parameter 'w': the destination spec \[null, mp\] cuts dim 1 \(256\) 4 ways", _fp8_model()),
    Case("fp8-scale-cut-by-config-block", [*CONVERT, "--dst-layout", "{tmp}/rows2.yaml"], 2,
         r"cuts dim 0 \(256\) 2 ways, not at a multiple of its 256-wide",
         _fp8_model(scale_shape=(1, 1), config='{"quantization_config": {"weight_block_size": [256, 256]}}')),
    Case("fp8-scale-wrong-shape", CONVERT, 2,
         r"parameter 'w_scale_inv' has shape \[3, 2\] but 'w' \[256, 256\] in 128 x 128 blocks needs \[2, 2\]",
         _fp8_model(scale_shape=(3, 2))),
    Case("fp8-scale-shape-vs-config-block", CONVERT, 2, r"in 64 x 64 blocks needs \[4, 4\]; check quantization_config",
         _fp8_model(config='{"quantization_config": {"weight_block_size": [64, 64]}}')),
    Case("fp8-block-size-not-ints", CONVERT, 2, r"config.json: quantization_config.weight_block_size is 128, not two",
         _fp8_model(config='{"quantization_config": {"weight_block_size": 128}}')),
    Case("fp8-block-size-zero", CONVERT, 2, r"weight_block_size is \[0, 128\], not two positive integers",
         _fp8_model(config='{"quantization_config": {"weight_block_size": [0, 128]}}')),
    Case("fp8-config-not-json", CONVERT, 2, r"config.json: corrupt config.json: not valid JSON",
         _fp8_model(config='{"quantization_config": ')),
    Case("fp8-config-huge", CONVERT, 2, r"config.json: over 16777216 bytes; not a model config",
         lambda tmp: _huge_config(tmp / "src")),
    Case("fp8-dequantize-bare", [*CONVERT, "--dequantize"], 2,
         r"--dequantize: FP8 parameter 'other' has no 'other_scale_inv' block scale", _fp8_model(bare=True)),
    Case("fp8-dequantize-not-a-dtype", [*CONVERT, "--dequantize", "--dtype", "int8"], 2, r"--dtype 'int8' is not a "
         r"floating type", _fp8_model()),
    Case("hf-companion-link-out", CONVERT, 2, r"tokenizer.model: a link to .*elsewhere.txt, outside the source folder",
         _hf_with(_link_out)),
    Case("hf-companion-dangling", CONVERT, 2, r"tokenizer_config.json: a companion file of the source cannot be read "
         r"\(a dangling link\?\)", _hf_with(_dangling)),
    Case("hf-companion-fifo", CONVERT, 2, r"special_tokens_map.json: a companion file of the source is not a regular "
         r"file", _hf_with(_fifo)),
    Case("hf-companion-huge", CONVERT, 2, r"tokenizer.json: 1073741825 bytes, over the 1073741824-byte cap",
         _hf_with(_huge)),
    Case("hf-companion-too-many", CONVERT, 2, r"more than 1000 non-weight files at the top of the source folder",
         _hf_with(_many)),
    Case("hf-with-ranks", [*CONVERT, "--hf", "--ranks", "0"], 2, r"--hf writes one complete safetensors checkpoint",
         _hf_with(lambda f: None)),
    Case("fp8-dequantize-with-verify", [*CONVERT, "--dequantize", "--verify"], 2,
         r"--verify compares the output's bytes with the source's, which --dequantize changes", _fp8_model()),
]

test_case = corpus_test(CASES)
