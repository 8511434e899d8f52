"""The planner seam: what every layout source implements, so the API never branches on which one it is.

A planner turns one source and the two layout sides into a `Plan` (typed frozen data, see plan.py); the
executor then follows the plan whatever planner made it. Three implementations:

- `NativePlanner` (native.py): native layouts (YAML, `Layout`, `(mesh, specs)`) and MindSpore strategies
  read as layouts, over rank files of any format;
- `MindSporePlanner` (mindspore.py): MindSpore strategies on both sides with `transform_checkpoints`
  semantics, a thin adapter over `mindspore.plan_mindspore`;
- `RestorePlanner` (restore.py): sources that restore whole arrays into any sharding themselves (orbax).

A new layout source (Megatron, torch DCP metadata) is one more class here with the same two methods, plus
one line in `sides.read_side` (to recognise its argument) and one in `api` (to choose it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..box import Box
from ..formats.writers import Flavour
from ..plan import Plan


@dataclass(frozen=True, slots=True)
class FileRequest:
    """Which rank files a conversion writes: names `rank_<r>/{prefix}{r}{suffix}`, only `dst_ranks` if given."""

    prefix: str = "checkpoint_"
    suffix: str = ".safetensors"
    dst_ranks: Iterable[int] | None = None


@dataclass(frozen=True, slots=True)
class ArrayRequest:
    """One in-memory destination array: the source parameter, the boxes this process's devices need (pure
    metadata from the sharding), and the dtype to hand back (None: as stored)."""

    src_param: str
    boxes: Sequence[Box]
    dtype: np.dtype | None = None


class Planner(Protocol):
    """Plans rank files (the `convert`, `plan` and `merge-lora` commands).

    Call sequence (api.plan_conversion):
      1. the API reads the source index (headers only) and the two layout sides (`sides.read_side`);
      2. it chooses and constructs the planner from what the sides and the source are;
      3. `plan(request)` returns the checked `Plan` (exact cover of every destination box), raising
         `PlanError`/`LayoutError`/`FormatError` before anything is written;
      4. `flavour` tells the writers which file flavour to write (see formats.writers.Flavour);
      5. the executor follows the plan; the planner is not called again.
    """

    @property
    def flavour(self) -> Flavour: ...

    def plan(self, request: FileRequest) -> Plan: ...


class ArrayPlanner(Protocol):
    """Plans in-memory arrays (`jaxreshard.load`): the same plan, a different sink (mergekit's
    `plan_to_disk` / `plan_in_memory`).

    Call sequence (load.load):
      1. `params()`: every source parameter, in order; `full_shape(param)`: its full shape and dtype (to check
         the target against; only for the parameters the target wants);
      2. `plan_arrays({name: ArrayRequest})`: a `Plan` keyed by destination name, with one in-memory rank
         (`dst_file` "") holding every requested box and a `Cast` where a dtype is asked for;
      3. arrays.build_array builds each array from that plan.
    """

    def params(self) -> list[str]: ...

    def full_shape(self, param: str) -> tuple[tuple[int, ...], np.dtype]: ...

    def plan_arrays(self, wanted: Mapping[str, ArrayRequest]) -> Plan: ...
