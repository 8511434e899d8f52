"""Many hosts: the conversion as a JAX multi-controller job (`jax.distributed`), one process per host.

Every process plans the whole conversion (headers only), then keeps the destination ranks whose devices it
owns: the destination mesh spans every process's devices, `make_array_from_callback` calls back only for
addressable devices, so each process reads only the source regions its own ranks need and writes only its own
rank folders (each committed atomically, so processes sharing a disk never clash and nodes without one end up
with exactly their ranks). There is no communication beyond JAX's own start-up handshake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Cluster:
    coordinator_address: str | None
    num_processes: int
    process_id: int


def cluster_from(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> Cluster | None:
    """The cluster from flags, else `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`; None
    when the run is a single process."""
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if address is None and count is None:
        return None
    if address is None or count is None or pid is None:
        raise ConfigError("a multi-process run needs --coordinator-address, --num-processes and --process-id "
                          "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    if not 0 <= pid < count:
        raise ConfigError(f"--process-id {pid} must be in 0..{count - 1}")
    return Cluster(address, count, pid)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def start(cluster: Cluster, devices_per_stage: int) -> int:
    """Join the JAX job with enough local CPU devices for an even share of the mesh; returns the local count."""
    local = max(1, -(-devices_per_stage // cluster.num_processes))
    if "jax" not in __import__("sys").modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local}".strip()
    import jax

    jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes, cluster.process_id)
    return len(jax.local_devices(backend="cpu"))


def owned_ranks(all_ranks: list[int], devices_per_stage: int, local_devices: int, process_id: int) -> list[int]:
    """Destination ranks whose mesh device belongs to this process (devices are ordered by process)."""
    return [r for r in all_ranks if (r % devices_per_stage) // local_devices == process_id]
