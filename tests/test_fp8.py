"""FP8 checkpoints: F8 dtypes carried byte for byte, block scales resharded with their weights, cut blocks
refused, and --dequantize / load(dequantize=True) against a numpy reference (ml_dtypes' float8 types)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import jaxreshard as jr
from jaxreshard.cli import main
from jaxreshard.errors import LayoutError

CODES = {np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
         np.dtype(ml_dtypes.float8_e8m0fnu): "F8_E8M0", np.dtype(ml_dtypes.float8_e4m3fnuz): "F8_E4M3FNUZ",
         np.dtype(ml_dtypes.float8_e5m2fnuz): "F8_E5M2FNUZ", np.dtype(np.float32): "F32",
         np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
         np.dtype(np.int64): "I64"}  # fmt: skip


def write_st(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """A safetensors file written by hand from the format's spec (safetensors.numpy has no F8 types)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def read_st(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and metadata of a safetensors file, parsed by hand (dtype codes -> ml_dtypes)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    by_code = {c: d for d, c in CODES.items()}
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + begin : 8 + n + end], by_code[info["dtype"]]).reshape(info["shape"])
    return out, meta


def fp8_model(rng, rows=256, cols=384, block=(128, 128)):
    w = rng.normal(size=(rows, cols)).astype(ml_dtypes.float8_e4m3fn)
    s = rng.uniform(0.01, 2.0, size=(math.ceil(rows / block[0]), math.ceil(cols / block[1]))).astype(np.float32)
    return {"layers.0.q_proj.weight": w, "layers.0.q_proj.weight_scale_inv": s,
            "layers.0.norm.weight": rng.normal(size=(cols,)).astype(ml_dtypes.bfloat16),
            "e5m2": rng.normal(size=(16, 8)).astype(ml_dtypes.float8_e5m2),
            "e8m0": rng.uniform(0.1, 8, size=(4, 4)).astype(ml_dtypes.float8_e8m0fnu)}  # fmt: skip


def layout(path: Path, mesh: dict, rules: list[tuple[str, list]]) -> Path:
    body = "".join(f"  - {{match: '{m}', spec: {json.dumps(s)}}}\n" for m, s in rules)
    path.write_text(f"mesh: {json.dumps(mesh)}\nparams:\n{body}")
    return path


def reference_dequant(w: np.ndarray, s: np.ndarray, block, dtype) -> np.ndarray:
    """float32(w) * scale of its block, rounded once to dtype: computed block by block with plain loops."""
    out = w.astype(np.float32).copy()
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            out[bi * block[0] : (bi + 1) * block[0], bj * block[1] : (bj + 1) * block[1]] *= s[bi, bj]
    return out.astype(dtype)


def test_fp8_dtypes_split_reshard_merge_byte_for_byte(tmp_path):
    model = fp8_model(np.random.default_rng(0))
    src = tmp_path / "src"
    src.mkdir()
    write_st(src / "model.safetensors", model, {"format": "pt"})
    mp2 = layout(tmp_path / "mp2.yaml", {"mp": 2}, [(r".*q_proj\.weight", ["mp", None]), ("e5m2", [None, "mp"])])
    col4 = layout(tmp_path / "c4.yaml", {"dp": 1, "mp": 2, "tp": 2}, [(r".*q_proj\.weight", [None, ["mp", "tp"]])])
    jr.convert(src, tmp_path / "a", dst_layout=mp2)
    # the scale is split with its weight: rank 1 holds rows 128..255 of W and row 1 of the scale
    r1, meta = read_st(tmp_path / "a/rank_1/checkpoint_1.safetensors")
    np.testing.assert_array_equal(r1["layers.0.q_proj.weight"].view(np.uint8),
                                  model["layers.0.q_proj.weight"][128:].view(np.uint8))
    np.testing.assert_array_equal(r1["layers.0.q_proj.weight_scale_inv"], model["layers.0.q_proj.weight_scale_inv"][1:])
    np.testing.assert_array_equal(r1["e5m2"].view(np.uint8), model["e5m2"][:, 4:].view(np.uint8))
    assert meta["format"] == "pt"
    with pytest.raises(LayoutError, match=r"q_proj\.weight.*cuts dim 1 \(384\) 4 ways"):
        jr.convert(tmp_path / "a", tmp_path / "b", dst_layout=col4)
    col3 = layout(tmp_path / "c3.yaml", {"mp": 3}, [(r".*q_proj\.weight", [None, "mp"])])
    jr.convert(tmp_path / "a", tmp_path / "b", dst_layout=col3)
    r2, _ = read_st(tmp_path / "b/rank_2/checkpoint_2.safetensors")
    scale = "layers.0.q_proj.weight_scale_inv"
    np.testing.assert_array_equal(r2[scale], model[scale][:, 2:])
    jr.convert(tmp_path / "b", tmp_path / "m", hf=True)
    merged, meta = read_st(tmp_path / "m/model.safetensors")
    assert sorted(merged) == sorted(model) and meta == {"format": "pt"}
    for name, array in model.items():
        assert merged[name].dtype == array.dtype
        assert merged[name].tobytes() == array.tobytes(), name


def test_dequantize_matches_numpy_reference(tmp_path, capsys):
    rng = np.random.default_rng(1)
    model = fp8_model(rng, rows=256, cols=320, block=(64, 32))  # partial blocks, the block size from config.json
    bare = {k: model.pop(k) for k in ("e5m2", "e8m0")}
    src = tmp_path / "src"
    src.mkdir()
    write_st(src / "model.safetensors", model)
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                          "weight_block_size": [64, 32]}}))
    mp2 = layout(tmp_path / "mp2.yaml", {"mp": 2}, [(r".*q_proj\.weight", [None, "mp"])])
    assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "a"), "--dst-layout", str(mp2), "-q"]) == 0
    assert main(["convert", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "d"), "--dst-layout", str(mp2),
                 "--dequantize", "-q"]) == 0
    w, s = model["layers.0.q_proj.weight"], model["layers.0.q_proj.weight_scale_inv"]
    want = reference_dequant(w, s, (64, 32), ml_dtypes.bfloat16)
    for rank in (0, 1):
        got, _ = read_st(tmp_path / f"d/rank_{rank}/checkpoint_{rank}.safetensors")
        assert sorted(got) == ["layers.0.norm.weight", "layers.0.q_proj.weight"]
        assert got["layers.0.q_proj.weight"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got["layers.0.q_proj.weight"].view(np.uint16),
                                      want[:, rank * 160 : (rank + 1) * 160].view(np.uint16))
        assert got["layers.0.norm.weight"].tobytes() == model["layers.0.norm.weight"].tobytes()
    jr.convert(src, tmp_path / "f32", hf=True, dequantize=True, dtype="fp32")
    got, meta = read_st(tmp_path / "f32/model.safetensors")
    np.testing.assert_array_equal(got["layers.0.q_proj.weight"], reference_dequant(w, s, (64, 32), np.float32))
    assert meta == {"format": "pt"}
    assert (tmp_path / "f32/config.json").read_bytes() == (src / "config.json").read_bytes()
    # an FP8 tensor without a scale cannot be dequantized: refused, naming it
    write_st(src / "model.safetensors", {**model, **bare})
    assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "x"), "--dequantize", "-q"]) == 2
    assert "FP8 parameter 'e5m2' has no 'e5m2_scale_inv'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_load_dequantize_into_shardings(tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model = fp8_model(np.random.default_rng(2))
    src = tmp_path / "src"
    src.mkdir()
    write_st(src / "model.safetensors", model)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("dp", "mp"))
    target = {"layers.0.q_proj.weight": NamedSharding(mesh, PartitionSpec("dp", "mp")),
              "layers.0.norm.weight": NamedSharding(mesh, PartitionSpec())}

    def rename(n: str) -> str | None:
        return n if n in target else None

    out = jr.load(src, target, dequantize=True, rename=rename, dtype="float32")
    want = reference_dequant(model["layers.0.q_proj.weight"], model["layers.0.q_proj.weight_scale_inv"], (128, 128),
                             np.float32)
    got = out["layers.0.q_proj.weight"]
    assert got.dtype == np.float32 and got.sharding == target["layers.0.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(out["layers.0.norm.weight"]),
                                  model["layers.0.norm.weight"].astype(np.float32))


def test_readme_fp8_example_runs(tmp_path):
    from tests.test_hf_folders import run_readme_example

    out = run_readme_example("FP8", tmp_path)
    assert out.strip() == "float32 (512, 256) P('mp', None)"
    merged, meta = read_st(tmp_path / "bf16_hf/model.safetensors")
    assert meta == {"format": "pt"} and not any(n.endswith("_scale_inv") for n in merged)
    src, _ = read_st(tmp_path / "fp8/model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    want = reference_dequant(src[name], src[name + "_scale_inv"], (128, 128), ml_dtypes.bfloat16)
    assert merged[name].tobytes() == want.tobytes()


def test_load_fp8_as_is_keeps_the_bytes(tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model = fp8_model(np.random.default_rng(3))
    src = tmp_path / "src"
    src.mkdir()
    write_st(src / "model.safetensors", model)
    mesh = Mesh(np.array(jax.devices()[:2]), ("mp",))
    target = {"layers.0.q_proj.weight": NamedSharding(mesh, PartitionSpec("mp", None)),
              "layers.0.q_proj.weight_scale_inv": NamedSharding(mesh, PartitionSpec("mp", None)),
              "e5m2": NamedSharding(mesh, PartitionSpec(None, "mp"))}
    out = jr.load(src, target, strict=False)
    for name, sharding in target.items():
        got = out[name]
        assert got.dtype == model[name].dtype and got.sharding == sharding, name
        assert np.asarray(got).tobytes() == model[name].tobytes(), name
