"""Loading any checkpoint straight into sharded `jax.Array`s: no converted files at all.

Training code says which sharding it wants for each parameter (a `Sharding`, or a `ShapeDtypeStruct` carrying
one); each process resolves the boxes its own devices need (`addressable_devices_indices_map`, pure metadata),
covers them with source regions exactly as a conversion plan does, reads only those bytes, and builds each array
with `make_array_from_callback`. Works for complete and per-rank checkpoints (safetensors, MindSpore .ckpt with
a strategy, native layouts) and orbax checkpoints, under `jax.distributed` too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .box import Box
from .coverage import cover, source_grid
from .errors import ConfigError, PlanError
from .formats.base import FileHandles
from .layout import COMPLETE
from .plan import ParamInfo, Plan, ShardPlan, full_shape, is_floating, merge_orders

Rename = Callable[[str], str | None] | Sequence[tuple[str, str]]


def _target_leaves(target: Any):
    import jax

    is_leaf = lambda x: isinstance(x, (jax.sharding.Sharding, jax.ShapeDtypeStruct))  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=is_leaf)
    names = [".".join(_key(k) for k in path) for path, _ in leaves]
    return dict(zip(names, (leaf for _, leaf in leaves))), treedef, names


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _renamer(rename: Rename | None) -> Callable[[str], str | None]:
    if rename is None:
        return lambda name: name
    if callable(rename):
        return rename
    table = [(re.compile(pattern), repl) for pattern, repl in rename]

    def apply(name: str) -> str | None:
        for regex, repl in table:
            name = regex.sub(repl, name)
        return name

    return apply


def load(
    src: str | Path,
    target: Any,
    *,
    src_strategy: str | Path | None = None,
    src_layout: Any = None,
    dtype: Any = None,
    rename: Rename | None = None,
    strict: bool = True,
) -> Any:
    """Load `src` into `target`'s shardings; returns the same structure with `jax.Array` leaves.

    `target`: a mapping (or any pytree) from parameter names (nested keys joined with '.') to a `Sharding` or
    a `jax.ShapeDtypeStruct` with a sharding. `rename` maps checkpoint names to target names (a callable
    returning None to skip a name, or (regex, replacement) pairs applied in order). `dtype` casts floating
    parameters. Missing, unexpected (with `strict`) and wrong-shaped or wrong-typed parameters are reported
    together in one error.
    """
    import jax

    from .api import native_layouts, parse_dtype
    from .execute import build_array
    from .formats import open_source
    from .formats.orbax_io import OrbaxSource, is_orbax

    leaves, treedef, order = _target_leaves(target)
    cast = parse_dtype(dtype) if isinstance(dtype, str) else (np.dtype(dtype) if dtype is not None else None)
    to_target = _renamer(rename)
    orbax = OrbaxSource(Path(src)) if is_orbax(Path(src)) else None
    if orbax is not None:
        if src_layout is not None or src_strategy is not None:
            raise ConfigError(f"{src}: an orbax checkpoint holds whole arrays; it takes no source layout")
        names = list(orbax.params)
        entries: dict = {}
        layouts = {n: COMPLETE for n in names}
    else:
        source = open_source(src)
        names = merge_orders([list(source.entries[r]) for r in sorted(source.entries)])
        layout, _ = native_layouts(source, src_layout, src_strategy)
        layouts = layout.resolve(names) if layout is not None else {n: COMPLETE for n in names}
        entries = source.entries
    mapping: dict[str, str] = {}
    for name in names:
        new = to_target(name)
        if new is not None:
            if new in mapping:
                raise ConfigError(f"rename maps both {mapping[new]!r} and {name!r} to {new!r}")
            mapping[new] = name
    infos, problems = {}, []
    missing = [t for t in order if t not in mapping]
    unexpected = [t for t in mapping if t not in leaves]
    for t in order:
        if t not in mapping:
            continue
        name = mapping[t]
        shape, src_dtype = orbax.params[name] if orbax else full_shape(name, layouts[name], entries)
        want = leaves[t]
        out_dtype = cast if cast is not None and is_floating(src_dtype) else src_dtype
        if isinstance(want, jax.ShapeDtypeStruct):
            if tuple(want.shape) != shape:
                problems.append(f"{t}: checkpoint shape {list(shape)}, target {list(want.shape)}")
            elif np.dtype(want.dtype) != out_dtype:
                problems.append(f"{t}: checkpoint dtype {out_dtype}, target {np.dtype(want.dtype)} (pass dtype=)")
            if want.sharding is None:
                problems.append(f"{t}: the ShapeDtypeStruct carries no sharding")
        infos[t] = ParamInfo(name, shape, src_dtype, out_dtype, layouts[name], COMPLETE, restore=orbax)
    if missing or (strict and unexpected) or problems:
        parts = [f"missing keys {_few(missing)}" if missing else "",
                 f"unexpected keys {_few(unexpected)} (strict=False ignores them)" if strict and unexpected else "",
                 "; ".join(problems)]
        raise PlanError(f"{src}: cannot load into the target: " + "; ".join(p for p in parts if p))
    view = {r: {t: e[mapping[t]] for t in infos if mapping[t] in e} for r, e in entries.items()}
    plan = Plan({t: i for t, i in infos.items()}, (), view)
    out = {}
    with FileHandles() as handles:
        for t, info in infos.items():
            want = leaves[t]
            sharding = want.sharding if isinstance(want, jax.ShapeDtypeStruct) else want
            shards: dict[Box, ShardPlan] = {}
            if orbax is None:
                grid = source_grid(t, info.shape, info.src_layout, view)
                for index in sharding.addressable_devices_indices_map(info.shape).values():
                    box = Box.from_index(index, info.shape)
                    if box not in shards:
                        shards[box] = ShardPlan(t, box, cover(grid, box))
            out[t] = build_array(plan, t, shards, sharding, handles, native=True)
    return jax.tree_util.tree_unflatten(treedef, [out[t] for t in order])


def _few(names: list[str], limit: int = 10) -> str:
    return str(sorted(names)[:limit])[:-1] + (f", ... {len(names) - limit} more]" if len(names) > limit else "]")


def shardings(layout: Any, params: Iterable[str] | Mapping[str, Sequence[int]] | str | Path, *,
              devices: Sequence[Any] | None = None, stage: int | None = None) -> dict[str, Any]:
    """`NamedSharding` of every parameter under a layout, on `devices` (default: `jax.devices()`).

    `params`: names, a mapping of names to shapes (ranks), or a checkpoint path to read them from. With
    pipeline stages, `stage` keeps only that stage's parameters (all share the same devices-per-stage mesh).
    """
    import jax
    from jax.sharding import NamedSharding

    from .execute import make_mesh

    if isinstance(params, (str, Path)):
        from .formats import open_source

        params = open_source(params).shapes
    names = list(params)
    resolved = layout.resolve(names)
    devices = list(devices) if devices is not None else jax.devices()
    meshes: dict = {}
    out = {}
    for name in names:
        pl = resolved[name]
        if stage is not None and stage not in pl.stages:
            continue
        if pl.devices_per_stage > len(devices):
            raise ConfigError(f"the layout needs {pl.devices_per_stage} devices per stage, {len(devices)} given")
        if pl.mesh_axes not in meshes:
            meshes[pl.mesh_axes] = make_mesh(pl, devices)
        mesh = meshes[pl.mesh_axes]
        if isinstance(params, Mapping):
            pl.check_shape(name, tuple(params[name]))
        out[name] = NamedSharding(mesh, pl.partition_spec())
    return out


def layout_from_yaml(path: str | Path, params: Any, **kwargs: Any) -> dict[str, Any]:
    """The `NamedSharding`s of a native layout file (see `shardings` for the arguments)."""
    from .layout import read_layout

    return shardings(read_layout(path), params, **kwargs)


def layout_from_strategy(path: str | Path, params: Any, **kwargs: Any) -> dict[str, Any]:
    """The `NamedSharding`s of a MindSpore strategy file or folder (`params` must give shapes or a checkpoint,
    since strategies do not record tensor ranks of parameters outside them)."""
    from .formats.mindspore_strategy import read_strategy
    from .mindspore import StrategyLayout

    if isinstance(params, (str, Path)):
        from .formats import open_source

        params = open_source(params).shapes
    strategy = read_strategy(Path(path))
    if not isinstance(params, Mapping):  # names only: tensor ranks from the strategy's own tensor maps
        names = list(params)
        return shardings(StrategyLayout(strategy, {n: len(strategy.params[n].tensor_map) for n in names}), names,
                         **kwargs)
    return shardings(StrategyLayout(strategy, {n: len(s) for n, s in params.items()}), params, **kwargs)
