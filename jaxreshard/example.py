"""A small, deterministic Llama-shaped checkpoint for the quickstart, the tests and the benchmark.

Hugging Face Llama names, grouped-query attention (fewer key/value heads than query heads), mixed dtypes
(bf16 weights, f32 norms, f16 lm_head, 64-bit scalars), no downloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from .formats.safetensors_io import SafetensorsWriter


@dataclass(frozen=True, slots=True)
class LlamaShape:
    vocab: int = 512
    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def llama_params(shape: LlamaShape = LlamaShape()) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, in checkpoint order."""
    bf16, f32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    out = [("model.embed_tokens.weight", bf16, (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", bf16, (h, h)),
            (p + "self_attn.k_proj.weight", bf16, (kv, h)),
            (p + "self_attn.v_proj.weight", bf16, (kv, h)),
            (p + "self_attn.o_proj.weight", bf16, (h, h)),
            (p + "mlp.gate_proj.weight", bf16, (shape.intermediate, h)),
            (p + "mlp.up_proj.weight", bf16, (shape.intermediate, h)),
            (p + "mlp.down_proj.weight", bf16, (h, shape.intermediate)),
            (p + "input_layernorm.weight", f32, (h,)),
            (p + "post_attention_layernorm.weight", f32, (h,)),
        ]
    out += [
        ("model.norm.weight", f32, (h,)),
        ("lm_head.weight", np.dtype(np.float16), (shape.vocab, h)),
        ("train_state.step", np.dtype(np.int64), ()),
        ("train_state.loss_scale", np.dtype(np.float64), ()),
    ]
    return out


def llama_tensor(name: str, dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Deterministic values for one tensor (a function of its name and the seed)."""
    rng = np.random.default_rng([seed, *name.encode()])
    if np.issubdtype(dtype, np.integer):
        return np.asarray(rng.integers(0, 1000, size=shape), dtype=dtype)
    if "norm" in name:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
    return (0.02 * rng.standard_normal(shape)).astype(dtype)


def write_llama_checkpoint(path: Path, shape: LlamaShape = LlamaShape(), seed: int = 0) -> Path:
    """Write the example as one complete safetensors file, one tensor at a time."""
    params = llama_params(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    writer = SafetensorsWriter(tmp, params)
    for name, dtype, dims in params:
        writer.write(name, llama_tensor(name, dtype, dims, seed))
    writer.close()
    os.replace(tmp, path)  # complete or absent, never half written
    return path


def quantize_fp8(weight: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-style block quantization: F8_E4M3 values and one float32 `scale_inv` per block, so that
    float32(q) * scale_inv approximates the weight (each block's largest |value| maps to 448, E4M3's max)."""
    rows, cols = weight.shape
    w = weight.astype(np.float32)
    scale = np.ones((-(-rows // block[0]), -(-cols // block[1])), np.float32)
    q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            scale[i, j] = max(float(np.abs(w[part]).max()), 1e-12) / 448.0
            q[part] = (w[part] / scale[i, j]).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def write_fp8_checkpoint(path: Path, shape: LlamaShape = LlamaShape(hidden=256, intermediate=512, kv_heads=8),
                         seed: int = 0) -> Path:
    """The example with every projection weight stored as F8_E4M3 plus its `<name>_scale_inv` (128 x 128
    blocks), the way DeepSeek-V3 checkpoints are; other tensors as in `write_llama_checkpoint`."""
    params = []
    for name, dtype, dims in llama_params(shape):
        if name.endswith("_proj.weight"):
            params += [(name, np.dtype(ml_dtypes.float8_e4m3fn), dims),
                       (name + "_scale_inv", np.dtype(np.float32), (-(-dims[0] // 128), -(-dims[1] // 128)))]
        else:
            params.append((name, dtype, dims))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    writer = SafetensorsWriter(tmp, params, {"format": "pt"})
    for name, dtype, dims in params:
        if name.endswith("_scale_inv"):
            continue
        value = llama_tensor(name, np.dtype(np.float32) if dtype.itemsize == 1 else dtype, dims, seed)
        if dtype.itemsize == 1:
            value, scale = quantize_fp8(value)
            writer.write(name + "_scale_inv", scale)
        writer.write(name, value)
    writer.close()
    os.replace(tmp, path)
    return path
