"""safetensors dtype codes: the header's `dtype` strings and the numpy dtypes they name (shared by the reader
and the writer)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    # 1-byte floats (FP8 checkpoints: DeepSeek-V3, Kimi), the codes the safetensors library writes; only ever
    # carried as bytes, never converted (`arrays.jax_dtype` moves them through JAX as uint8)
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
FP8_CODES = ("F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "F8_E8M0")
FP8_DTYPES = frozenset(DTYPES[code] for code in FP8_CODES)  # (ml_dtypes gives float8_e5m2 kind "f", the rest "V")
# packed sub-byte floats: safetensors stores two F4 (or four F6 in three bytes) per byte, ml_dtypes one per byte,
# so their byte ranges are not element ranges; refused by name rather than misread
PACKED_CODES = ("F4", "F6_E2M3", "F6_E3M2")
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
