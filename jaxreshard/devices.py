"""JAX's CPU devices as jaxreshard uses them: fake ones requested before JAX starts, one rank order, meshes.

`request_cpu_devices` / `ensure_cpu_devices` must run before JAX initialises its backends, which is why JAX is
imported lazily here; the distributed start-up, the executor and the orbax adapter share these rules without
importing each other.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import LayoutError
from .layout import ParamLayout

_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"  # XLA's flag for fake host (CPU) devices


def request_cpu_devices(count: int) -> None:
    """Ask XLA for `count` CPU devices through XLA_FLAGS. It works only before JAX is imported (JAX reads the
    flags once), and a device count the user already set wins."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{_DEVICE_COUNT_FLAG}={max(count, 1)}".strip()


def ensure_cpu_devices(count: int) -> None:
    """Make sure JAX has at least `count` CPU devices (fake ones on a plain CPU host).

    Must run before JAX initialises its backends; afterwards only a check is possible, and a clear error
    tells the user how to get enough devices.
    """
    request_cpu_devices(count)
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
            f"XLA_FLAGS=--{_DEVICE_COUNT_FLAG}={count} before importing jax, or run the CLI"
        )


def cpu_devices_in_rank_order() -> list[Any]:
    """Every CPU device of the job, ordered by process then id: destination rank r is device r of its stage."""
    import jax  # lazy: importing this module must not start JAX before request_cpu_devices ran

    return sorted(jax.devices("cpu"), key=lambda d: (d.process_index, d.id))


cpu_devices = cpu_devices_in_rank_order


def make_mesh(layout: ParamLayout, devices: Sequence[Any]) -> Any:
    """The mesh of one pipeline stage of `layout`, on the first `devices_per_stage` of `devices`."""
    from jax.sharding import Mesh

    n = layout.devices_per_stage
    arr = np.empty(n, dtype=object)
    arr[:] = list(devices[:n])
    return Mesh(arr.reshape(layout.mesh_shape), layout.axis_names)
