"""User values read from flags, job files and keywords: booleans, dtype names, byte sizes.

A leaf (it imports only `errors` and `caps`), so the command table, the MindFormers shims, the library API and `verify`
share one reading of each value without importing each other.
"""

from __future__ import annotations

import re
from typing import overload

import ml_dtypes
import numpy as np

from .caps import MAX_RANKS
from .errors import ConfigError

DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "f64": "float64",
}  # fmt: skip
_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}  # fmt: skip


def parse_bool(text: str | bool) -> bool:
    """'True'/'false'/'1'/'0'/'yes'/'no' -> bool (argparse's `type=bool` makes 'False' true)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@overload
def parse_dtype(name: str) -> np.dtype: ...
@overload
def parse_dtype(name: str | None) -> np.dtype | None: ...


def parse_dtype(name: str | None) -> np.dtype | None:
    """A `--dtype` name (float32, fp16, bf16, ...) -> numpy dtype; None stays None (keep the stored dtype)."""
    if name is None:
        return None
    canonical = DTYPE_NAMES.get(str(name).lower())
    if canonical is None:
        raise ConfigError(f"--dtype {name!r} is not a floating type; use one of {sorted(set(DTYPE_NAMES.values()))}")
    return np.dtype(ml_dtypes.bfloat16) if canonical == "bfloat16" else np.dtype(canonical)


def parse_size(text: str | int | None) -> int | None:
    """'5GB' / '500MiB' / 1000 -> bytes (decimal units for KB/MB/GB like huggingface_hub, binary for KiB...)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"size {text!r} is not understood; write e.g. 5GB, 500MiB or 1000000")
    unit = (m.group(2) or "").upper().rstrip("B")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_ranks(text: str | None) -> list[int] | None:
    """'0-3,8' -> [0, 1, 2, 3, 8]; ASCII digits only, every rank below `MAX_RANKS`, checked before any range is
    expanded (so '0-300000000' is refused at once instead of building a list of 300 million ranks)."""
    if text is None or text == "":
        return None
    spans: list[tuple[int, int]] = []
    for part in str(text).split(","):
        bounds = [b.strip() for b in part.split("-")] if part.count("-") <= 1 else []
        if not bounds or not all(b.isascii() and b.isdigit() for b in bounds):
            raise ConfigError(f"--ranks {str(text)[:80]!r} is not a rank list; write e.g. 0-3,8 (ranges ascending)")
        for digits in bounds:
            if len(digits) > 9 or int(digits) >= MAX_RANKS:
                raise ConfigError(f"--ranks {str(text)[:80]!r}: rank {digits[:20]} is beyond the cap of {MAX_RANKS} "
                                  f"ranks (0-{MAX_RANKS - 1}); give the destination's ranks")
        first, last = int(bounds[0]), int(bounds[-1])
        if first > last:
            raise ConfigError(f"--ranks {str(text)[:80]!r} is not a rank list; write e.g. 0-3,8 (ranges ascending)")
        spans.append((first, last))
    return sorted({r for first, last in spans for r in range(first, last + 1)})
