"""The devices the executor builds arrays on: fake CPU devices when needed, and meshes of them.

`ensure_cpu_devices` must run before JAX initialises its backends, which is why JAX is imported lazily here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import LayoutError
from .layout import ParamLayout


def ensure_cpu_devices(count: int) -> None:
    """Make sure JAX will have at least `count` CPU devices (fake ones on a plain CPU host).

    Must run before JAX initialises its backends; afterwards only a check is possible, and a clear error
    tells the user how to get enough devices.
    """
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(count, 1)}".strip()
    import jax

    try:
        have = len(jax.devices("cpu"))
    except RuntimeError:
        have = 0
    if have < count:
        try:  # possible only while no backend has been initialised yet
            jax.config.update("jax_num_cpu_devices", count)
            have = len(jax.devices("cpu"))
        except Exception:  # noqa: BLE001 - the check below reports the real problem
            pass
    if have < count:
        raise LayoutError(
            f"the destination layout needs {count} devices per stage but JAX has {have} CPU devices; set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before importing jax, or run the CLI"
        )


def cpu_devices() -> list[Any]:
    """The CPU devices in rank order: rank r is device r, by process (what every rank file assumes)."""
    import jax

    return sorted(jax.devices("cpu"), key=lambda d: (d.process_index, d.id))


def make_mesh(layout: ParamLayout, devices: Sequence[Any]) -> Any:
    """The mesh of one pipeline stage of `layout`, on the first `devices_per_stage` of `devices`."""
    from jax.sharding import Mesh

    n = layout.devices_per_stage
    arr = np.empty(n, dtype=object)
    arr[:] = list(devices[:n])
    return Mesh(arr.reshape(layout.mesh_shape), layout.axis_names)
