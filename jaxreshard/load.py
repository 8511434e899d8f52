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

from . import fp8, remote
from .arrays import build_array
from .devices import make_mesh
from .errors import ConfigError, PlanError
from .formats import open_source
from .formats.base import FileHandles
from .formats.mindspore_strategy import read_strategy
from .formats.orbax_io import OrbaxSource, is_orbax
from .layout import read_layout
from .mindspore import StrategyLayout
from .plan import is_floating
from .planners import ArrayRequest, NativePlanner, RestorePlanner, one_side, read_side
from .planners.native import boxes_of
from .rules import Rules
from .values import parse_dtype

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
        return lambda param: param
    if callable(rename):
        return rename
    table = [(re.compile(pattern), repl) for pattern, repl in rename]

    def apply(param: str) -> str | None:
        for regex, repl in table:
            param = regex.sub(repl, param)
        return param

    return apply


@remote.views(sources=("src",))
def load(
    src: str | Path,
    target: Any,
    *,
    src_strategy: str | Path | None = None,
    src_layout: Any = None,
    dtype: Any = None,
    rename: Rename | None = None,
    strict: bool = True,
    transform: Any = None,
    dequantize: bool = False,
) -> Any:
    """Load `src` into `target`'s shardings; returns the same structure with `jax.Array` leaves.

    `target`: a mapping (or any pytree) from parameter names (nested keys joined with '.') to a `Sharding` or
    a `jax.ShapeDtypeStruct` with a sharding. `src_layout`: as `convert`'s (a layout YAML path, a MindSpore
    strategy file or folder, a `Layout`, `(mesh, specs)`); `src_strategy` is its alias. `rename` maps
    checkpoint names to target names (a callable returning None to skip a name, or (regex, replacement) pairs
    applied in order). `dtype` casts floating parameters. Missing, unexpected (with `strict`) and wrong-shaped
    or wrong-typed parameters are reported together in one error. `transform` (a rules YAML path, a parsed
    mapping or `Rules`, see `convert`) renames, transposes, stacks and concatenates tensors while loading, each
    box read from only the source regions it needs; `target` then names the transformed tensors. `dequantize`
    loads block-scaled FP8 weights as `dtype(float32(w) * scale)` per block (`dtype` default bf16); their
    `_scale_inv` tensors are not loaded.
    """
    import jax

    leaves, treedef, order = _target_leaves(target)
    cast = parse_dtype(dtype) if isinstance(dtype, str) else (np.dtype(dtype) if dtype is not None else None)
    rules = Rules.load(transform) if transform is not None else None
    planner = array_planner(src, one_side(src_layout, src_strategy, "src"), rules)
    names = planner.params()
    pairs = fp8.scale_pairs(names) if dequantize else {}
    mapping = _target_names([p for p in names if p not in pairs], _renamer(rename))
    full_shape = fp8.dequantized_shape(planner.full_shape, set(pairs.values()), cast) if pairs else planner.full_shape
    wanted = _requests(src, full_shape, mapping, leaves, order, cast, strict)
    plan = planner.plan_arrays(wanted)
    if pairs:
        plan = fp8.load_dequantized(plan, planner, pairs)
    shards: dict[str, dict] = {param: {} for param in wanted}
    for shard in (s for rank in plan.ranks for s in rank.shards):
        shards[shard.param][shard.dst_box] = shard
    out = {}
    with FileHandles() as handles:
        for param in wanted:
            out[param] = build_array(plan, param, shards[param], _sharding(leaves[param]), handles, native=True)
    return jax.tree_util.tree_unflatten(treedef, [out[param] for param in order])


def array_planner(src: str | Path, src_arg: Any, rules: Rules | None = None) -> NativePlanner | RestorePlanner:
    """The planner of a load: orbax restores arrays itself; anything else is read box by box (through the
    transform `rules` if given: the planner then names the transformed tensors)."""
    if is_orbax(Path(src)):
        if src_arg is not None:
            raise ConfigError(f"{src}: an orbax checkpoint holds whole arrays; it takes no source layout")
        if rules is not None:
            raise ConfigError(f"{src}: transform= reads safetensors or .ckpt sources box by box; not orbax")
        return RestorePlanner(OrbaxSource(Path(src)))
    return NativePlanner(open_source(src), read_side(src_arg), rules=rules)


def _target_names(params: list[str], to_target: Callable[[str], str | None]) -> dict[str, str]:
    """Target name -> checkpoint name; two checkpoint names renamed to one target is an error."""
    mapping: dict[str, str] = {}
    for param in params:
        new = to_target(param)
        if new is not None:
            if new in mapping:
                raise ConfigError(f"rename maps both {mapping[new]!r} and {param!r} to {new!r}")
            mapping[new] = param
    return mapping


def _sharding(want: Any) -> Any:
    import jax

    return want.sharding if isinstance(want, jax.ShapeDtypeStruct) else want


def _requests(src: str | Path, full_shape: Callable[[str], tuple[tuple[int, ...], np.dtype]], mapping: dict[str, str],
              leaves: dict[str, Any], order: list[str], cast: np.dtype | None,
              strict: bool) -> dict[str, ArrayRequest]:  # fmt: skip
    """What to read for each target leaf, after checking the target against the checkpoint (all problems in
    one `PlanError`)."""
    import jax

    wanted, problems = {}, []
    missing = [param for param in order if param not in mapping]
    unexpected = [param for param in mapping if param not in leaves]
    for param in order:
        if param not in mapping:
            continue
        shape, src_dtype = full_shape(mapping[param])
        want = leaves[param]
        out_dtype = cast if cast is not None and is_floating(src_dtype) else src_dtype
        if isinstance(want, jax.ShapeDtypeStruct):
            if tuple(want.shape) != shape:
                problems.append(f"{param}: checkpoint shape {list(shape)}, target {list(want.shape)}")
            elif np.dtype(want.dtype) != out_dtype:
                problems.append(f"{param}: checkpoint dtype {out_dtype}, target {np.dtype(want.dtype)} (pass dtype=)")
            if want.sharding is None:
                problems.append(f"{param}: the ShapeDtypeStruct carries no sharding")
                continue
        wanted[param] = ArrayRequest(mapping[param], boxes_of(_sharding(want), shape), out_dtype)
    if missing or (strict and unexpected) or problems:
        parts = [f"missing keys {_few(missing)}" if missing else "",
                 f"unexpected keys {_few(unexpected)} (strict=False ignores them)" if strict and unexpected else "",
                 "; ".join(problems)]
        raise PlanError(f"{src}: cannot load into the target: " + "; ".join(p for p in parts if p))
    return wanted


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

    if isinstance(params, (str, Path)):
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


def shardings_from_yaml(path: str | Path, params: Any, **kwargs: Any) -> dict[str, Any]:
    """The `NamedSharding`s of a native layout file (see `shardings` for the arguments)."""
    return shardings(read_layout(path), params, **kwargs)


def shardings_from_strategy(path: str | Path, params: Any, **kwargs: Any) -> dict[str, Any]:
    """The `NamedSharding`s of a MindSpore strategy file or folder (`params` must give shapes or a checkpoint,
    since strategies do not record tensor ranks of parameters outside them)."""
    if isinstance(params, (str, Path)):
        params = open_source(params).shapes
    strategy = read_strategy(Path(path))
    if not isinstance(params, Mapping):  # names only: tensor ranks from the strategy's own tensor maps
        names = list(params)
        return shardings(StrategyLayout(strategy, {n: len(strategy.params[n].tensor_map) for n in names}), names,
                         **kwargs)
    return shardings(StrategyLayout(strategy, {n: len(s) for n, s in params.items()}), params, **kwargs)


layout_from_yaml = shardings_from_yaml  # the old names (they return shardings, not a layout)
layout_from_strategy = shardings_from_strategy
