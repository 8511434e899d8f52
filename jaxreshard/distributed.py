"""Many hosts: the conversion as a JAX multi-controller job (`jax.distributed`), one process per host.

Every process plans the whole conversion (headers only), then keeps the destination ranks whose devices it
owns: the destination mesh spans every process's devices, `make_array_from_callback` calls back only for
addressable devices, so each process reads only the source regions its own ranks need and writes only its own
rank folders (each committed atomically, so processes sharing a disk never clash and nodes without one end up
with exactly their ranks). There is no communication beyond JAX's own start-up handshake.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .caps import MAX_RANKS
from .devices import request_cpu_devices
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
    check_address(address)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_RANKS:
        raise ConfigError(f"--num-processes {count!r:.40} must be an integer in 1..{MAX_RANKS}")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < count:
        raise ConfigError(f"--process-id {pid!r:.40} must be in 0..{count - 1}")
    return Cluster(address, count, pid)


_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?):([0-9]{1,5})", re.ASCII)


def check_address(address: str) -> None:
    """Refuse a coordinator address that is not host:port with a port in 1..65535 (jax.distributed would wait
    for a coordinator that can never answer, or fail deep inside with a traceback)."""
    m = _ADDRESS.fullmatch(str(address))
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ConfigError(f"--coordinator-address {str(address)[:80]!r} must be host:port with a port in 1..65535, "
                          "e.g. 10.0.0.1:1234 or [::1]:1234")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    if not re.fullmatch(r"\s*[0-9]{1,9}\s*", value, re.ASCII):
        raise ConfigError(f"{name}={value[:40]!r} is not a non-negative integer")
    return int(value)


def start(cluster: Cluster, devices_per_stage: int) -> int:
    """Join the JAX job with enough local CPU devices for an even share of the mesh; returns the local count."""
    local = max(1, -(-devices_per_stage // cluster.num_processes))
    request_cpu_devices(local)
    import jax

    jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes, cluster.process_id)
    return len(jax.local_devices(backend="cpu"))


def owned_ranks(all_ranks: list[int], devices_per_stage: int, local_devices: int, process_id: int) -> list[int]:
    """Destination ranks whose mesh device belongs to this process (devices are ordered by process)."""
    return [r for r in all_ranks if (r % devices_per_stage) // local_devices == process_id]
