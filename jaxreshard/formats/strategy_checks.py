"""Checks of MindSpore strategy values, so a wrong or hostile strategy is refused instead of converting wrongly.

MindSpore's own reader trusts these values: a device-matrix entry of 0 makes "no rank", a float or string one is
truncated, two parameters on different device counts leave part of a tensor on no rank, and a tensor-map entry
past the device matrix indexes from the wrong end. Each check here runs on the raw values of one layout item
before anything is expanded, so every error names the file and the parameter, and caps (`caps.py`) bound the
work a strategy can ask for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..caps import MAX_MESH_AXES, MAX_RANKS, MAX_TENSOR_MAP
from ..errors import FormatError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_dev_matrix(dev: Any, where: str) -> int:
    """Refuse a device matrix that is not positive integers within the caps; returns its device count."""
    if len(dev) > MAX_MESH_AXES:
        raise FormatError(f"{where}: dev_matrix has {len(dev)} entries, over the cap of {MAX_MESH_AXES}")
    devices = 1
    for d in dev:
        if not _is_int(d) or d < 1:
            raise FormatError(f"{where}: dev_matrix {list(dev)!r:.120} holds {d!r:.40}; every entry must be a "
                              "positive integer (a device count per axis)")
        devices *= min(d, MAX_RANKS + 1)
        if devices > MAX_RANKS:
            raise FormatError(f"{where}: dev_matrix {list(dev)} has over {MAX_RANKS} devices, the cap; the "
                              "strategy is corrupt or not a strategy")
    return devices


def check_tensor_map(tmap: Any, ndev: int, where: str) -> None:
    """Refuse tensor-map entries outside [-1, len(dev_matrix) - 1] and a device axis used twice."""
    if len(tmap) > MAX_TENSOR_MAP:
        raise FormatError(f"{where}: tensor_map has {len(tmap)} entries, over the cap of {MAX_TENSOR_MAP}")
    used: set[int] = set()
    for entry in tmap:
        axes = entry if isinstance(entry, tuple) else (entry,)
        if not axes:
            raise FormatError(f"{where}: tensor_map {list(tmap)!r:.120} has an empty entry")
        for axis in axes:
            if not _is_int(axis) or not -1 <= axis < ndev:
                raise FormatError(f"{where}: tensor_map {list(tmap)!r:.120} holds {axis!r:.40}; entries must be -1 "
                                  f"or a device-matrix axis 0..{ndev - 1}")
            if axis != -1 and axis in used:
                raise FormatError(f"{where}: tensor_map {list(tmap)!r:.120} uses device axis {axis} twice; a "
                                  "device axis can split only one tensor dim")
            used.add(axis)


def check_opt_shard(step: Any, size: Any, devices: int, where: str) -> None:
    """Refuse optimizer-shard values MindSpore never writes: step in 0..devices, size -1, 0 or 1..devices."""
    if not _is_int(step) or not 0 <= step <= devices:
        raise FormatError(f"{where}: opt_weight_shard_step {step!r:.40} must be an integer in 0..{devices}")
    if not _is_int(size) or not -1 <= size <= devices:
        raise FormatError(f"{where}: opt_weight_shard_size {size!r:.40} must be -1, 0 or an integer in 1..{devices}")


def check_layout_item(dev: Any, tmap: Any, step: Any, size: Any, where: str) -> int:
    """Every check of one parameter's raw layout; returns its device count."""
    devices = check_dev_matrix(dev, where)
    check_tensor_map(tmap, len(dev), where)
    check_opt_shard(step, size, devices, where)
    return devices


def check_stage(value: Any, where: str) -> int:
    """A pipeline stage number: a non-negative integer below the rank cap (ASCII digits when it is text)."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()) or len(value) > 6:
            raise FormatError(f"{where}: stage {value!r:.40} is not a small non-negative integer")
        value = int(value)
    if not _is_int(value) or not 0 <= value < MAX_RANKS:
        raise FormatError(f"{where}: stage {value!r:.40} must be an integer in 0..{MAX_RANKS - 1}")
    return value


def check_device_counts(layouts: Mapping[str, Iterable[tuple[int, Any]]], source: str, stage_num: int) -> int:
    """Every parameter of every stage must live on the same number of devices; returns that number.

    A parameter on 4 devices next to one on 16 is a strategy of two different jobs: converting it would leave
    3/4 of the smaller one's blocks on no rank, so it is refused naming both parameters.
    """
    first: tuple[str, int] | None = None
    for name, entries in layouts.items():
        for stage, layout in entries:
            devices = math.prod(layout.dev_matrix)
            if first is None:
                first = (name, devices)
            elif devices != first[1]:
                raise FormatError(
                    f"{source}: parameter {name!r} (stage {stage}) is laid out on {devices} devices but "
                    f"{first[0]!r} on {first[1]}; every parameter of a strategy must use the same device count per "
                    "stage (are two strategies mixed?)"
                )
    devices = first[1] if first else 1
    if devices * stage_num > MAX_RANKS:
        raise FormatError(f"{source}: {stage_num} stages x {devices} devices is over the cap of {MAX_RANKS} ranks")
    return devices
