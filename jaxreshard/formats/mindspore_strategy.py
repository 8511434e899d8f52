"""MindSpore parallel strategy files (`node_strategy.proto`): per-rank, merged-pipeline and JSON flavours, read
into pure data.

Decoding uses the protobuf runtime with the message classes of `mindspore_strategy_proto` (MindSpore itself
parses these files with the runtime, so required-field checks, unknown fields and repeated-field merging behave
exactly as there). Writing: `mindspore_strategy_write`.

A directory is merged in memory exactly like `merge_pipeline_strategys` (byte-identical files skipped, the first
file of each stage wins, `.ckpt` and `.json` never mixed); it is only read, never written to. Files are taken in
natural name order (rank_2 before rank_10) instead of MindSpore's unordered glob, so the result is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from ..caps import MAX_RANKS, MAX_STRATEGY_BYTES
from ..errors import FormatError
from ..readfile import one_line, read_regular_file
from .mindspore_strategy_proto import ParallelStrategyMap
from .strategy_checks import check_device_counts, check_layout_item, check_stage
from .untrusted import check_json_width

TensorMapEntry = int | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ParamStrategy:
    """One parameter's layout as MindSpore's `_convert_to_list` sees it."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[TensorMapEntry, ...]  # a multi-axis (Layout) entry is a tuple; one-axis entries are ints
    opt_shard_step: int
    opt_shard_size: int  # as stored: 0, -1 (whole repeated group) or k
    stages: tuple[int, ...]  # every pipeline stage listing the parameter, ascending


class FrozenMap(Mapping):
    """An immutable, hashable, ordered mapping, so that `Strategy` stays a frozen value."""

    __slots__ = ("_d",)

    def __init__(self, items: Any = ()) -> None:
        self._d = dict(items)

    def __getitem__(self, key: Any) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(tuple(self._d.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


@dataclass(frozen=True, slots=True)
class Strategy:
    """A whole strategy: `params` holds the layout MindSpore uses without a rank (the lowest stage's);
    `entries` keeps every stage's own layout, in file order, for the per-rank and per-stage choices."""

    params: FrozenMap  # name -> ParamStrategy, in first-seen order
    stage_device_num: int  # prod(dev_matrix of the first parameter): devices per pipeline stage
    stage_num: int
    source: str = field(compare=False)  # the file or directory it came from, for messages
    entries: FrozenMap  # name -> ((stage, ParamStrategy), ...) in file order
    file_stage: int = 0  # stage of the first strategy item (MindSpore's by-stage path)

    def layout_for_stage(self, name: str, stage: int) -> ParamStrategy:
        """The layout of `name` in pipeline `stage` (shared parameters may differ per stage)."""
        for s, layout in self.entries[name]:
            if s == stage:
                return layout
        raise KeyError(f"{self.source}: {name!r} is not in pipeline stage {stage} (only {self.params[name].stages})")

    def layout_for_rank(self, name: str, rank: int) -> ParamStrategy:
        """`_convert_to_list(strategy, rank_id=rank)`'s choice: the stage-0 entry for ranks of the first stage,
        else the last entry of a later stage (the first entry when no later one qualifies)."""
        entries = self.entries[name]
        chosen = entries[0][1]
        for stage, layout in entries[1:]:
            first = rank // math.prod(layout.dev_matrix) == 0
            if (first and stage == 0) or (not first and stage > 0):
                chosen = layout
        return chosen

    def stage_params(self, stage: int) -> dict[str, ParamStrategy]:
        """Every parameter of one stage with that stage's own layout (what that stage's file held)."""
        return {n: layout for n, e in self.entries.items() for s, layout in e if s == stage}


def _tensor_map(maps: Sequence[Sequence[int]]) -> tuple[TensorMapEntry, ...]:
    """Several TensorMaps = one per tensor dim, each a list of axes, empty ones dropped (as `_convert_to_list`)."""
    if len(maps) > 1:
        return tuple(m[0] if len(m) == 1 else tuple(m) for m in (list(m) for m in maps) if m)
    return tuple(int(x) if isinstance(x, int) else (x[0] if len(x) == 1 else tuple(x)) for x in maps[0])


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _parse_proto(data: bytes, source: Any) -> Any:
    message = ParallelStrategyMap()
    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise FormatError(f"{source}: not a MindSpore strategy file, or a truncated one ({e}); a name not ending in "
                          f".json must hold the protobuf ParallelStrategyMap MindSpore saves; save it again") from e
    if not message.IsInitialized():
        raise FormatError(f"{source}: the strategy file lacks required fields {message.FindInitializationErrors()}; "
                          f"it is truncated or corrupt, save it again with MindSpore")
    for item in message.parallel_layout_item:  # the runtime hands invalid UTF-8 over as bytes
        if not isinstance(item.param_name, str):
            raise FormatError(f"{source}: parameter name {item.param_name[:80]!r} is not UTF-8; the file is corrupt")
    return message


def _parse_json(data: bytes, path: Path) -> dict:
    """A JSON strategy from the bytes already read (a folder's files are read once, for their hash and this)."""
    check_json_width(data, path, "JSON strategy file")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: cannot read the JSON strategy file: {one_line(str(e))}") from e
    except RecursionError:
        raise FormatError(f"{path}: the JSON strategy file is nested too deeply to be a strategy") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k, {}), dict)
                                            for k in ("parallel_layout_item", "parallel_strategy_item")):
        raise FormatError(f"{path}: not a MindSpore JSON strategy (no parallel_layout_item object)")
    return doc


def _read_bytes(path: Path) -> bytes:
    data = read_regular_file(path, MAX_STRATEGY_BYTES, FormatError, "the strategy file")
    if not data:
        raise FormatError(f"{path}: the strategy file is empty; save it again with MindSpore")
    return data


def _first_stage(doc: Any, source: Any) -> int | None:
    """The pipeline stage of a file: that of its first strategy item, as MindSpore reads it (None without one)."""
    if not isinstance(doc, dict):
        if not doc.parallel_strategy_item:
            return None
        return check_stage(doc.parallel_strategy_item[0].parallel_strategys.stage, f"{source}: first strategy item")
    try:
        items = doc.get("parallel_strategy_item") or {}
        return check_stage(next(iter(items.values()))["stage"], f"{source}: first strategy item") if items else None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{source}: malformed parallel_strategy_item, no stage in its first item ({e!r})") from e


def _strategy_file(path: Path) -> bool:
    """Whether a `*.ckpt`/`*.json` entry of a strategy folder is read: a regular file yes, a sub-folder no; a
    FIFO, device or dangling link is refused (it was skipped in silence, then "no strategy files" misled)."""
    if path.is_file():
        return True
    if path.is_dir():
        return False
    raise FormatError(f"{path}: is not a regular file (a FIFO, device or dangling link); a strategy folder may hold "
                      "only regular strategy files")


def merge_pipeline_strategies(directory: Path) -> tuple[str, Any]:
    """`merge_pipeline_strategys` without writing: `("proto", ParallelStrategyMap)` or `("json", dict)`."""
    directory = Path(directory)
    kinds = {s: sorted((p for p in directory.glob(f"*.{s}") if _strategy_file(p)), key=_natural)
             for s in ("ckpt", "json")}
    if kinds["ckpt"] and kinds["json"]:
        raise FormatError(f"{directory}: mixes .ckpt and .json strategy files; keep one kind (as MindSpore requires)")
    files = kinds["ckpt"] or kinds["json"]
    if not files:
        raise FormatError(f"{directory}: no strategy files (*.ckpt or *.json) in this directory")
    if len(files) > MAX_RANKS:
        raise FormatError(f"{directory}: {len(files)} strategy files, over the cap of {MAX_RANKS} (one per rank)")
    merged: Any = ParallelStrategyMap() if kinds["ckpt"] else {"current_stage": 1, "parallel_strategy_item": {},
                                                               "parallel_layout_item": {}}
    seen: set[bytes] = set()
    stages: list[int] = []
    for path in files:
        data = _read_bytes(path)
        digest = hashlib.sha256(data).digest()  # byte-identical copies of one stage's file are skipped
        if digest in seen:
            continue
        seen.add(digest)
        doc = _parse_proto(data, path) if kinds["ckpt"] else _parse_json(data, path)
        stage = _first_stage(doc, path)
        layouts = doc.get("parallel_layout_item") if isinstance(doc, dict) else doc.parallel_layout_item
        if stage is None or not layouts:
            raise FormatError(f"{path}: has no strategy items or no parameter layouts, so its pipeline stage is "
                              f"unknown; remove it from {directory} or save it again with MindSpore")
        if stage in stages:
            continue
        stages.append(stage)
        if isinstance(doc, dict):
            merged["parallel_layout_item"].update({f"{stage}-{n}": v for n, v in layouts.items()})
            merged["parallel_strategy_item"].update(doc["parallel_strategy_item"])
        else:
            for item in layouts:
                item.param_name = f"{stage}-{item.param_name}"
            merged.parallel_strategy_item.extend(doc.parallel_strategy_item)
            merged.parallel_layout_item.extend(layouts)
    if not isinstance(merged, dict):
        merged.current_stage = 1
    return ("json" if kinds["json"] else "proto"), merged


def _json_tensor_map(raw: Any) -> tuple[TensorMapEntry, ...]:
    """A JSON tensor_map: each entry an integer or a list of integers (kept as found, checked later)."""
    if not isinstance(raw, list):
        raise TypeError(f"tensor_map must be a list, got {type(raw).__name__}")
    return tuple((e[0] if len(e) == 1 else tuple(e)) if isinstance(e, list) else e for e in raw)


def _raw_layouts(doc: Any, source: Any) -> Iterator[tuple[str, tuple, tuple, int, int]]:
    """(name as stored, dev_matrix, tensor_map, opt step, opt size) per layout item, as a dict keeps them, each
    checked (`strategy_checks.check_layout_item`) so a wrong value is refused naming the parameter."""
    if isinstance(doc, dict):
        for name, item in doc.get("parallel_layout_item", {}).items():
            try:
                if not isinstance(item["dev_matrix"], list):
                    raise TypeError("dev_matrix must be a list")
                raw = (name, tuple(item["dev_matrix"]), _json_tensor_map(item["tensor_map"]),
                       item.get("opt_weight_shard_step", 0), item.get("opt_weight_shard_size", 0))
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                raise FormatError(f"{source}: parameter {name!r:.200}: malformed JSON layout ({e!r:.200})") from e
            check_layout_item(*raw[1:], f"{source}: parameter {name!r:.200}")
            yield raw
        return
    items = {item.param_name: item.parallel_layouts for item in doc.parallel_layout_item}  # later duplicates win
    for name, layout in items.items():
        if not layout.dev_matrix or not layout.tensor_map:
            raise FormatError(f"{source}: parameter {name!r} has no dev_matrix or no tensor_map; the file is corrupt")
        raw = (name, tuple(layout.dev_matrix[0].dim), _tensor_map([list(t.dim) for t in layout.tensor_map]),
               layout.opt_weight_shard_step, layout.opt_weight_shard_size)
        check_layout_item(*raw[1:], f"{source}: parameter {name!r:.200}")
        yield raw


def _build(doc: Any, source: str) -> Strategy:
    per_name: dict[str, list[tuple[int, tuple[Any, Any, int, int]]]] = {}  # (stage, (dev, tmap, step, size))
    for raw, dev, tmap, step, size in _raw_layouts(doc, source):
        stage, name = 0, raw
        if "-" in raw:  # "<stage>-<name>" of a merged file; MindSpore cannot read other names with "-"
            head, name = raw.split("-", 1)
            if not head.isdecimal():
                raise FormatError(f"{source}: parameter {raw!r}: MindSpore reads a '-' in a strategy name as "
                                  f"'<stage>-<name>', and {head!r} is no stage; rename the parameter")
            stage = check_stage(head, f"{source}: parameter {raw!r:.200}")
        per_name.setdefault(name, []).append((stage, (dev, tmap, step, size)))
    if not per_name:
        raise FormatError(f"{source}: the strategy has no parameter layouts, so there is nothing to convert")
    params, entries = {}, {}
    for name, found in per_name.items():
        stages = tuple(sorted({s for s, _ in found}))
        entries[name] = tuple((s, ParamStrategy(*fields, stages)) for s, fields in found)
        chosen, seen = entries[name][0][1], [found[0][0]]
        for stage, layout in entries[name][1:]:  # _convert_to_list(rank_id=None): the lowest stage's entry
            seen.append(stage)
            if stage <= min(seen):
                chosen = layout
        params[name] = chosen
    all_stages = sorted({s for p in params.values() for s in p.stages})
    if all_stages != list(range(len(all_stages))):
        raise FormatError(f"{source}: pipeline stages {all_stages} are not 0..{len(all_stages) - 1}: a stage's "
                          f"strategy is missing; merge the files of every stage (pass their directory)")
    first = next(iter(params))
    if not params[first].dev_matrix:
        raise FormatError(f"{source}: parameter {first!r} has an empty dev_matrix: the strategy only contains "
                          f"pipeline-parallelism, which MindSpore cannot convert either")
    devices = check_device_counts(entries, source, len(all_stages))
    return Strategy(FrozenMap(params), devices, len(all_stages), source, FrozenMap(entries),
                    _first_stage(doc, source) or 0)


def read_strategy(path: Path) -> Strategy:
    """A strategy file (`.json` by name, else protobuf) or a directory of per-rank/per-stage files."""
    path = Path(path)
    if path.is_dir():
        _, merged = merge_pipeline_strategies(path)
        return _build(merged, str(path))
    if path.name.endswith(".json"):
        data = read_regular_file(path, MAX_STRATEGY_BYTES, FormatError, "the JSON strategy file")
        return _build(_parse_json(data, path), str(path))
    return _build(_parse_proto(_read_bytes(path), path), str(path))
