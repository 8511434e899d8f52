"""JAX's CPU devices as jaxreshard uses them: fake ones requested before JAX starts, and one rank order.

A leaf module (standard library only; JAX is imported inside the one function that needs it), so that the
distributed start-up, the executor and the orbax adapter share these rules without importing each other.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"  # XLA's flag for fake host (CPU) devices


def request_cpu_devices(count: int) -> None:
    """Ask XLA for `count` CPU devices through XLA_FLAGS. It works only before JAX is imported (JAX reads the
    flags once), and a device count the user already set wins."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{_DEVICE_COUNT_FLAG}={max(count, 1)}".strip()


def cpu_devices_in_rank_order() -> list[Any]:
    """Every CPU device of the job, ordered by process then id: destination rank r is device r of its stage."""
    import jax  # lazy: importing this module must not start JAX before request_cpu_devices ran

    return sorted(jax.devices("cpu"), key=lambda d: (d.process_index, d.id))
