"""Choosing the per-rank writer for an output format, and the Hugging Face multi-file writer."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from .base import RankWriter
from .mindspore_ckpt import CkptRankWriter
from .safetensors_io import DTYPE_CODES, HF_INDEX, SafetensorsWriter, split_into_files

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("safetensors", "ckpt")
Params = list[tuple[str, np.dtype, tuple[int, ...]]]

# safetensors' Dtype enum order; `save_file` stores tensors by descending dtype, then by name
_SAFETENSORS_DTYPE_RANK = {code: i for i, code in enumerate(
    ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
)}  # fmt: skip


def save_file_order(params: Params) -> Params:
    """The order `safetensors.numpy.save_file` writes (what MindSpore's safetensors files have)."""
    return sorted(params, key=lambda p: (-_SAFETENSORS_DTYPE_RANK[DTYPE_CODES[np.dtype(p[1])]], p[0]))


def writer_factory(output_format: str, dst_dir: Path, *, hf: bool = False, max_file_bytes: int | None = None,
                   mindspore: bool = False):
    """A `(path, params, rank_plan) -> RankWriter` for the executor.

    `mindspore` selects MindSpore's safetensors flavour (`{"format": "ms"}` metadata, save_file's tensor order)
    so files equal what `transform_checkpoints` writes.
    """

    def make(path: Path, params: Params, rank) -> RankWriter:
        if output_format == "safetensors" and rank.extras:
            log.warning("%s: text entries %s cannot be stored in safetensors and are left out",
                        path.name, [k for k, _ in rank.extras])
        if hf:
            return HfWriter(dst_dir, params, max_file_bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        if output_format == "ckpt":
            return CkptRankWriter(path, params, dict(rank.extras), rank.order or None)
        if mindspore:
            return SafetensorsWriter(path, save_file_order(params), {"format": "ms"})
        return SafetensorsWriter(path, params)

    return make


class HfWriter:
    """A complete checkpoint as `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.

    File boundaries are fixed up front from the sizes (no renames at the end); the index is written last,
    after every part is complete, so a reader never sees an index pointing at a missing part.
    """

    def __init__(self, dst_dir: Path, params: Params, max_file_bytes: int | None):
        sizes = [math.prod(shape) * np.dtype(dt).itemsize for _, dt, shape in params]
        groups = split_into_files(sizes, max_file_bytes)
        self._dst_dir = dst_dir
        self._total = sum(sizes)
        self._writers: list[SafetensorsWriter] = []
        self._file_of: dict[str, int] = {}
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            self._writers.append(SafetensorsWriter(dst_dir / name, [params[j] for j in group]))
            for j in group:
                self._file_of[params[j][0]] = i

    def write(self, param: str, array: np.ndarray) -> None:
        self._writers[self._file_of[param]].write(param, array)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        weight_map = {p: self._writers[i].path.name for p, i in self._file_of.items()}
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        (self._dst_dir / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
