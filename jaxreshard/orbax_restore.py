"""Orbax as a source and a destination of the ordinary plan: the plan whose parameters orbax restores straight
into their destination shardings, and the writing of a plan's complete parameters as one orbax checkpoint.

This is the orchestration above the orbax codec (`formats/orbax_io.py`: metadata, restore, batched save), kept out
of `formats/` because it builds plans and arrays on meshes, which the ground floor must not import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .devices import cpu_devices_in_rank_order
from .errors import FormatError
from .execute import build_array, ensure_cpu_devices, make_mesh
from .formats.base import FileHandles
from .formats.orbax_io import OrbaxSource, OrbaxWriter, x64
from .fsutil import atomic_output
from .layout import COMPLETE
from .plan import ParamInfo, Plan, ShardPlan, dst_rank_list, rank_plans


def plan_orbax_source(path: Path, dst_layout: Any, *, prefix: str, suffix: str, dst_ranks: Any = None) -> Any:
    """A plan whose parameters orbax restores straight into each destination sharding (no byte ranges)."""
    source = OrbaxSource(path)
    names = list(source.params)
    dst = dst_layout.resolve(names) if dst_layout is not None else {n: COMPLETE for n in names}
    infos = {}
    for name in names:
        shape, dtype = source.params[name]
        dst[name].check_shape(name, shape)
        infos[name] = ParamInfo(name, shape, dtype, dtype, COMPLETE, dst[name], restore=source)
    total = dst_layout.num_ranks if dst_layout is not None else 1
    wanted = dst_rank_list(dst_ranks, total)
    ranks = rank_plans(infos, wanted, prefix, suffix, lambda name, box: ShardPlan(name, box, ()))
    return Plan(infos, ranks, {})


def write_orbax(plan: Any, dst: Path, *, overwrite: bool) -> None:
    """The complete parameters of `plan` as one orbax checkpoint at `dst`, each array carrying its destination
    sharding; written into a temporary sibling and renamed into place when finalized."""
    dst = Path(dst).absolute()  # orbax refuses relative paths (its temporaries are made from this one)
    if any(info.direct for info in plan.params.values()):
        raise FormatError("orbax output holds complete parameters; MindSpore pass-through copies cannot be written")
    ensure_cpu_devices(max((i.dst_layout.devices_per_stage for i in plan.params.values()), default=1))
    with atomic_output(Path(dst), overwrite=overwrite) as tmp:
        with x64(any(i.dst_dtype.itemsize == 8 for i in plan.params.values())):  # keep 64-bit parameters 64-bit
            _write_all(plan, tmp / "checkpoint")
        inner = tmp / ".orbax-checkpoint"  # orbax wants a path of its own: move its files up into the temporary
        os.rename(tmp / "checkpoint", inner)
        for child in inner.iterdir():
            os.rename(child, tmp / child.name)
        inner.rmdir()


def _write_all(plan: Any, path: Path) -> None:
    """Build each parameter on its destination mesh and add it to the checkpoint, batch by batch."""
    from jax.sharding import NamedSharding  # lazy: JAX starts after ensure_cpu_devices asked for its devices

    devices = cpu_devices_in_rank_order()
    boxes: dict[str, dict] = {}
    for rank in plan.ranks:
        for shard in rank.shards:
            boxes.setdefault(shard.param, {})[shard.dst_box] = shard
    writer = OrbaxWriter(path, list(plan.params))
    with FileHandles() as handles:
        for param, info in plan.params.items():
            sharding = NamedSharding(make_mesh(info.dst_layout, devices), info.dst_layout.partition_spec())
            writer.add(param, build_array(plan, param, boxes.get(param, {}), sharding, handles, native=True))
    writer.close()
