"""Choosing the per-rank writer for an output format, and the Hugging Face multi-file writer."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .base import RankWriter
from .manifest import FileRecord, file_sha256
from .mindspore_ckpt_write import CkptRankWriter
from .safetensors_io import DTYPE_CODES, HF_INDEX, SafetensorsWriter, split_into_files

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("safetensors", "ckpt", "orbax")
Flavour = Literal["native", "mindspore"]


@dataclass(frozen=True, slots=True)
class OutputKind:
    """What files a job writes: the format, and its flavour. "mindspore" is what `transform_checkpoints`
    writes (safetensors with `{"format": "ms"}` metadata in save_file's tensor order, no carried metadata);
    "native" carries the source's metadata and jaxreshard's per-rank block records."""

    format: str  # one of OUTPUT_FORMATS
    flavour: Flavour = "native"
Params = list[tuple[str, np.dtype, tuple[int, ...]]]

# safetensors' Dtype enum order; `save_file` stores tensors by descending dtype, then by name
_SAFETENSORS_DTYPE_RANK = {code: i for i, code in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16",
     "I32", "U32", "F32", "F64", "I64", "U64"]
)}  # fmt: skip


def save_file_order(params: Params) -> Params:
    """The order `safetensors.numpy.save_file` writes (what MindSpore's safetensors files have)."""
    return sorted(params, key=lambda p: (-_SAFETENSORS_DTYPE_RANK[DTYPE_CODES[np.dtype(p[1])]], p[0]))


def writer_factory(kind: OutputKind, dst_dir: Path, *, hf: bool = False, max_file_bytes: int | None = None,
                   metadata: dict[str, str] | None = None, describe=None,
                   resumed: dict[Path, tuple] | None = None):
    """A `(path, params, rank_plan) -> RankWriter` for the executor, writing files of `kind`.

    The "mindspore" flavour writes MindSpore's safetensors (`{"format": "ms"}` metadata, save_file's tensor
    order) so files equal what `transform_checkpoints` writes. Otherwise safetensors files carry the source's
    `metadata`, plus what `describe(rank_plan)` returns (the `jaxreshard` key of distributed rank files).
    `resumed` maps files a killed run wrote in part to (bytes written, their hashlib sha256): continued.
    """

    def make(path: Path, params: Params, rank) -> RankWriter:
        if kind.format == "safetensors" and rank.texts:
            log.warning("%s: text entries %s cannot be stored in safetensors and are left out",
                        path.name, [t.param for t in rank.texts])
        if hf:
            return HfWriter(dst_dir, params, max_file_bytes, metadata)
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind.format == "ckpt":
            return CkptRankWriter(path, params, {t.param: t.value for t in rank.texts}, rank.order or None)
        if kind.flavour == "mindspore":
            return SafetensorsWriter(path, save_file_order(params), {"format": "ms"})
        return SafetensorsWriter(path, params, {**(metadata or {}), **(describe(rank) if describe else {})},
                                 resume=(resumed or {}).get(path))

    return make


HF_MAX_FILE_BYTES = 5 * 10**9  # transformers' `save_pretrained` default max_shard_size, "5GB"
HF_SINGLE = "model.safetensors"


def hf_part_split(params: Params, max_file_bytes: int | None) -> tuple[list[list[int]], list[str], str]:
    """Hugging Face: greedy in order, `model-0000i-of-0000n.safetensors`, `model.safetensors.index.json`."""
    groups = split_into_files([_nbytes(p) for p in params], max_file_bytes)
    return groups, [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))], HF_INDEX


def transformers_split(params: Params, max_file_bytes: int | None) -> tuple[list[list[int]], list[str], str]:
    """As transformers' `save_pretrained` names files: one part is `model.safetensors` (and no index), more
    are `hf_part_split`'s parts + index."""
    groups, names, index = hf_part_split(params, max_file_bytes)
    return groups, [HF_SINGLE] if len(groups) == 1 else names, index


MS_PART_BYTES = 3 << 30  # MindSpore's unified_safetensors cuts parts of about 3 GiB


def ms_part_split(params: Params, part_bytes: int = MS_PART_BYTES) -> tuple[list[list[int]], list[str], str]:
    """MindSpore's `unified_safetensors`: ceil(total / 3 GiB) parts filled biggest tensor first into the
    emptiest part, `part{i}.safetensors`, `param_name_map.json`."""
    sizes = [_nbytes(p) for p in params]
    count = max(1, -(-sum(sizes) // part_bytes))
    groups: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for i in sorted(range(len(params)), key=lambda i: -sizes[i]):
        j = load.index(min(load))
        groups[j].append(i)
        load[j] += sizes[i]
    groups = [sorted(g) for g in groups if g]
    return groups, [f"part{i}.safetensors" for i in range(len(groups))], "param_name_map.json"


def _nbytes(param: tuple[str, np.dtype, tuple[int, ...]]) -> int:
    return math.prod(param[2]) * np.dtype(param[1]).itemsize


class PartsWriter:
    """A complete checkpoint cut into part files (`only`: the parts this process writes); `close` writes the
    index (`weight_map`, `metadata.total_size`) last, after every part is complete, when `index` is set."""

    def __init__(self, dst_dir: Path, params: Params, layout: tuple[list[list[int]], list[str], str],
                 only: set[int] | None = None, index: bool = True, metadata: dict[str, str] | None = None,
                 file_order=lambda params: params):
        groups, names, self._index_name = layout
        self._dst_dir, self._index = dst_dir, index
        self._total = sum(_nbytes(p) for p in params)
        self._weight_map = {params[j][0]: names[i] for i, g in enumerate(groups) for j in g}
        self._writers: dict[str, SafetensorsWriter] = {}
        for i, group in enumerate(groups):
            if only is None or i in only:
                self._writers[names[i]] = SafetensorsWriter(dst_dir / names[i], file_order([params[j] for j in group]),
                                                            metadata)

    def write(self, param: str, array: np.ndarray) -> None:
        self._writers[self._weight_map[param]].write(param, array)

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()

    def close(self) -> dict[Path, FileRecord]:
        """Close every part (then write the index); size and SHA-256 of each file written."""
        done: dict[Path, FileRecord] = {}
        for writer in self._writers.values():
            done.update(writer.close())
        if self._index:
            path = self._dst_dir / self._index_name
            write_index(path, self._weight_map, self._total)
            done[path] = FileRecord(path.stat().st_size, file_sha256(path))
        return done


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    path.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n")


def HfWriter(dst_dir: Path, params: Params, max_file_bytes: int | None,
             metadata: dict[str, str] | None = None) -> PartsWriter:
    """A complete checkpoint as transformers writes it (`model.safetensors`, or parts + index past
    `max_file_bytes`, default 5 GB); file boundaries are fixed up front from the sizes (no renames at the end);
    parts carry the source's metadata. Within a file tensors are in `save_file`'s order (what transformers
    writes through it), so a one-file output is byte for byte what `save_pretrained` writes."""
    split = transformers_split(params, HF_MAX_FILE_BYTES if max_file_bytes is None else max_file_bytes)
    return PartsWriter(dst_dir, params, split, index=len(split[0]) > 1, metadata=metadata,
                       file_order=save_file_order)


hf_layout = hf_part_split  # the old names (they plan part files, not a layout)
ms_layout = ms_part_split
