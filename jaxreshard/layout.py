"""Layouts: which box of each parameter every rank holds.

A layout is a device mesh (ordered axis -> size), a number of pipeline stages, and per parameter a
`PartitionSpec`-like spec plus the stages that hold it. Local rank r is device r of the mesh in row-major
order over the axes as written (`np.arange(n).reshape(sizes)`); global rank = stage * devices_per_stage +
local rank. This module is pure: it neither imports JAX nor touches files, so planning runs anywhere; the
executor turns a `ParamLayout` into a `jax.sharding.NamedSharding` with `mesh_shape`/`partition_spec`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .caps import MAX_MESH_AXES, MAX_NAME_CHARS, MAX_RANKS
from .errors import LayoutError
from .paramlayout import COMPLETE as COMPLETE  # re-exported: users import these from `layout`
from .paramlayout import ParamLayout as ParamLayout
from .paramlayout import Spec as Spec
from .paramlayout import format_spec as format_spec
from .paramlayout import unravel as unravel
from .saferegex import compile_safe
from .yamlfile import load_yaml


@dataclass(frozen=True, slots=True)
class Rule:
    """One `params:` entry of a layout file: the first rule whose `match` fullmatches a name wins."""

    match: str
    spec: Spec
    stage: int | str | None  # int (negative from the last stage), "by_layer", or None (= stage 0)


@dataclass(frozen=True, slots=True)
class Layout:
    """A layout as written (rules over names); `resolve` applies it to a checkpoint's parameter names.

    A name that matches no rule is replicated on every rank of every stage (like MindSpore's pass-through of
    parameters absent from a strategy, e.g. `global_step`).
    """

    mesh_axes: tuple[tuple[str, int], ...]
    pipeline_stages: int
    rules: tuple[Rule, ...]
    source: str = "<layout>"

    @property
    def devices_per_stage(self) -> int:
        return math.prod(size for _, size in self.mesh_axes)

    @property
    def num_ranks(self) -> int:
        return self.devices_per_stage * self.pipeline_stages

    def __post_init__(self) -> None:
        check_mesh(self.mesh_axes, self.pipeline_stages, self.source)

    def resolve(self, params: Iterable[str]) -> dict[str, ParamLayout]:
        """`ParamLayout` of every name, in the given order.

        `stage: by_layer` puts a layer on stage `position * pipeline_stages // num_layers`, where `position` is
        its index's place among the sorted distinct layer indices found (so indices {0, 1, 10, 11} on 2 stages
        give {0, 1} to stage 0 and {10, 11} to stage 1, whatever the numbering's gaps).
        """
        params = list(params)
        compiled = [compile_safe(rule.match, f"{self.source}: rule {i}", LayoutError)
                    for i, rule in enumerate(self.rules)]
        matched: dict[str, tuple[Rule, int | None] | None] = {}
        layers: set[int] = set()
        for param in params:
            if len(param) > MAX_NAME_CHARS:
                raise LayoutError(f"{self.source}: parameter name {param[:80]!r}... is {len(param)} characters long, "
                                  f"over the cap of {MAX_NAME_CHARS} for matching layout rules")
            matched[param] = None
            for rule, regex in zip(self.rules, compiled):
                m = regex.fullmatch(param)
                if m:
                    layer = _layer_index(self.source, rule, m, param) if rule.stage == "by_layer" else None
                    matched[param] = (rule, layer)
                    if layer is not None:
                        layers.add(layer)
                    break
        position = {layer: i for i, layer in enumerate(sorted(layers))}
        out = {}
        all_stages = tuple(range(self.pipeline_stages))
        for param in params:
            hit = matched[param]
            if hit is None:
                out[param] = ParamLayout(self.mesh_axes, (), all_stages)
                continue
            rule, layer = hit
            if layer is not None:
                stage = position[layer] * self.pipeline_stages // len(position)
            elif rule.stage is None:
                stage = 0
            else:
                stage = int(rule.stage) % self.pipeline_stages
            out[param] = ParamLayout(self.mesh_axes, rule.spec, (stage,))
        return out


def _layer_index(source: str, rule: Rule, m: re.Match[str], param: str) -> int:
    text = m.group(1) if m.re.groups else None
    if not isinstance(text, str) or not (text.isascii() and text.isdigit()):
        raise LayoutError(
            f"{source}: rule {rule.match!r} has stage: by_layer but its first capture group does not capture an "
            f"integer layer index in {param!r}; write the layer number as (\\d+)"
        )
    return int(text)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_mesh(mesh_axes: Sequence[tuple[str, int]], stages: Any, source: str) -> None:
    """Refuse a mesh or stage count that is not positive integers, or whose rank count exceeds the caps
    (bools are ints in Python and are refused too: `dp: true` is a typo, not a size of 1)."""
    if len(mesh_axes) > MAX_MESH_AXES:
        raise LayoutError(f"{source}: mesh has {len(mesh_axes)} axes, over the cap of {MAX_MESH_AXES}")
    devices = 1
    for name, size in mesh_axes:
        if not isinstance(name, str) or not name:
            raise LayoutError(f"{source}: mesh axis name {name!r} must be a non-empty string")
        if not _positive_int(size):
            raise LayoutError(f"{source}: mesh axis {name!r} has size {size!r:.80}; sizes must be positive integers, "
                              "e.g. {dp: 2, mp: 4}")
        devices *= min(size, MAX_RANKS + 1)
        if devices > MAX_RANKS:
            raise LayoutError(f"{source}: mesh {dict(mesh_axes)} has over {MAX_RANKS} devices, the cap on devices "
                              "per stage; check the sizes")
    if not _positive_int(stages):
        raise LayoutError(f"{source}: pipeline_stages must be a positive integer, got {stages!r:.80}")
    if devices * stages > MAX_RANKS:
        raise LayoutError(f"{source}: {stages} pipeline stages x {devices} devices = {devices * stages} ranks, over "
                          f"the cap of {MAX_RANKS} ranks")


def parse_spec(raw: Any, axes: Mapping[str, int], where: str) -> Spec:
    """Parse a YAML/PartitionSpec-style spec: each entry an axis name, null, or a list of names (major first)."""
    if raw is None:
        raw = []
    if not isinstance(raw, (list, tuple)):
        raise LayoutError(f"{where}: spec must be a list like [mp, null], got {raw!r}")
    spec: list[tuple[str, ...]] = []
    used: set[str] = set()
    for entry in raw:
        names: tuple[str, ...]
        if entry is None:
            names = ()
        elif isinstance(entry, str):
            names = (entry,)
        elif isinstance(entry, (list, tuple)) and all(isinstance(e, str) for e in entry):
            names = tuple(entry)
        else:
            raise LayoutError(f"{where}: spec entry {entry!r} must be an axis name, null, or a list of axis names")
        for name in names:
            if name not in axes:
                raise LayoutError(f"{where}: unknown mesh axis {name!r} in spec; the mesh has axes {list(axes)}")
            if name in used:
                raise LayoutError(f"{where}: mesh axis {name!r} is used twice in one spec")
            used.add(name)
        spec.append(names)
    return tuple(spec)


def _mesh_axes(mesh: Any, source: str) -> tuple[tuple[str, int], ...]:
    if mesh is None:
        return ()
    if not isinstance(mesh, dict):
        raise LayoutError(f"{source}: mesh must map axis names to positive integers, e.g. {{dp: 2, mp: 4}}")
    axes = tuple(mesh.items())
    check_mesh(axes, 1, source)
    return axes


def _rule(item: Any, mesh_axes: tuple[tuple[str, int], ...], stages: int, where: str) -> Rule:
    if not isinstance(item, dict) or "match" not in item:
        raise LayoutError(f"{where}: each rule needs a 'match' regex and a 'spec'")
    extra = set(map(str, item)) - {"match", "spec", "stage"}
    if extra:
        raise LayoutError(f"{where}: unknown keys {sorted(extra)}; valid keys are match, spec, stage")
    compile_safe(item["match"], where, LayoutError)
    stage = item.get("stage")
    in_range = isinstance(stage, int) and not isinstance(stage, bool) and -stages <= stage < stages
    if not (stage is None or stage == "by_layer" or in_range):
        raise LayoutError(f"{where}: stage must be an integer in [{-stages}, {stages - 1}] or by_layer, "
                          f"got {stage!r:.80}")
    return Rule(item["match"], parse_spec(item.get("spec"), dict(mesh_axes), where), stage)


def layout_from_dict(data: Any, source: str = "<layout>") -> Layout:
    """Build a `Layout` from the parsed native layout file (see README, "Layout files")."""
    if not isinstance(data, dict):
        raise LayoutError(f"{source}: a layout file must be a mapping with keys mesh, pipeline_stages, params")
    unknown = set(map(str, data)) - {"mesh", "pipeline_stages", "params"}
    if unknown:
        raise LayoutError(f"{source}: unknown keys {sorted(unknown)}; valid keys are mesh, pipeline_stages, params")
    mesh_axes = _mesh_axes(data.get("mesh"), source)
    stages = data.get("pipeline_stages", 1)
    check_mesh(mesh_axes, stages, source)
    params = data.get("params")
    if params is None:
        params = []
    if not isinstance(params, list):
        raise LayoutError(f"{source}: params must be a list of rules like {{match: '.*', spec: []}}")
    rules = tuple(_rule(item, mesh_axes, stages, f"{source}: params[{i}]") for i, item in enumerate(params))
    return Layout(mesh_axes, stages, rules, source)


def read_layout(path: str | Path) -> Layout:
    """Read a native layout YAML file (a regular UTF-8 file, size-, depth- and alias-capped)."""
    return layout_from_dict(load_yaml(path, LayoutError, "layout file"), str(path))


def layout_from_mesh(mesh: Any, specs: Mapping[str, Any], pipeline_stages: int = 1) -> Layout:
    """A `Layout` from a `jax.sharding.Mesh` and a mapping of name regexes to `PartitionSpec`s (or lists),
    checked like a layout file."""
    source = "<mesh layout>"
    try:
        mesh_axes = tuple((str(name), size) for name, size in zip(mesh.axis_names, mesh.devices.shape))
    except (AttributeError, TypeError):
        raise LayoutError(f"{source}: {type(mesh).__name__} is not a jax.sharding.Mesh") from None
    check_mesh(mesh_axes, pipeline_stages, source)
    if not isinstance(specs, Mapping):
        raise LayoutError(f"{source}: specs must map name regexes to PartitionSpecs, got {type(specs).__name__}")
    rules = []
    for pattern, spec in specs.items():
        where = f"{source}: spec for {pattern!r:.80}"
        compile_safe(pattern, where, LayoutError)
        try:
            entries = list(spec) if spec is not None else []
        except TypeError:
            raise LayoutError(f"{where}: spec must be a PartitionSpec or a list, got {spec!r:.80}") from None
        rules.append(Rule(pattern, parse_spec(entries, dict(mesh_axes), where), None))
    return Layout(mesh_axes, pipeline_stages, tuple(rules), source)
