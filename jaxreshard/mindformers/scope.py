"""Who converts what in an automatic conversion: nodes, blocks of destination ranks, and their converters.

Node k holds global ranks `[k * npu_num_per_node, (k + 1) * npu_num_per_node)` (MindFormers' rule). With a
shared disk the destination ranks are cut into `transform_process_num` blocks for the whole job (process
`i * world_size / n` converts block i, as MindFormers does); without one each node cuts its own ranks into
`transform_process_num` blocks for its own converters, so no process ever depends on another node.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..errors import ConfigError

MINDFORMERS_NPU_NUM_PER_NODE = 8


def default_npu_num_per_node() -> int:
    """The devices of this process's host: `jax.local_device_count()` when this process already runs under an
    initialised `jax.distributed` (JAX is never imported here just to find out), else `DEVICE_NUM_PER_NODE`
    (MindFormers' variable), else 8, as MindFormers assumes."""
    jax = sys.modules.get("jax")
    if jax is not None:
        try:
            if jax.distributed.is_initialized():
                return int(jax.local_device_count())
        except (AttributeError, RuntimeError):  # an old JAX without is_initialized, or no backend
            pass
    env = os.environ.get("DEVICE_NUM_PER_NODE", "")
    return int(env) if env.isdigit() and int(env) > 0 else MINDFORMERS_NPU_NUM_PER_NODE


def _positive_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a whole number of at least 1, got {value!r}")
    return value


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


@dataclass(frozen=True)
class Scope:
    """One process's place in an automatic conversion."""

    rank: int
    world: int
    npu: int  # devices per node (at most the world size: a job smaller than a node is one node)
    processes: int  # transform_process_num: converters per job (shared disk) or per node (no shared disk)
    shared_disk: bool

    @property
    def node(self) -> int:
        return self.rank // self.npu

    @property
    def node_ranks(self) -> range:
        return range(self.node * self.npu, (self.node + 1) * self.npu)

    @property
    def node_label(self) -> str:
        return f"node {self.node} (ranks {_span(self.node_ranks[0], self.node_ranks[-1])})"

    @property
    def _span_size(self) -> int:
        """Processes per block: the converter of a block is the first of them."""
        return (self.world if self.shared_disk else self.npu) // self.processes

    @property
    def _first(self) -> int:
        return 0 if self.shared_disk else self.node_ranks[0]

    @property
    def _prefix(self) -> str:
        return "" if self.shared_disk else f"node_{self.node}_"

    @property
    def block_names(self) -> list[str]:
        """The blocks this process waits for: all of the job's (shared disk) or its node's."""
        return [f"{self._prefix}block_{i}" for i in range(self.processes)]

    @property
    def my_index(self) -> int:
        return (self.rank - self._first) // self._span_size

    @property
    def my_block(self) -> str:
        return self.block_names[self.my_index]

    @property
    def converter(self) -> bool:
        return (self.rank - self._first) % self._span_size == 0

    def converter_rank(self, block: str) -> int:
        return self._first + self.block_names.index(block) * self._span_size

    def block_ranks(self, total: int) -> list[int]:
        """The destination ranks this converter writes, given the destination layout's rank count."""
        if self.shared_disk:
            if total % self.processes:
                raise ConfigError(f"transform_process_num {self.processes} must divide the {total} destination ranks")
            size = total // self.processes
            return list(range(self.my_index * size, (self.my_index + 1) * size))
        if total == 1:  # a complete destination: every node converts it for its own devices
            mine = [0]
        elif total < self.world:
            raise ConfigError(f"{self.node_label}: ranks {_span(total, self.world - 1)} of the job's {self.world} are "
                              f"outside the destination layout, which has {total} ranks; give a destination layout "
                              "for the job's devices, or check world_size and npu_num_per_node")
        elif total > self.world:
            raise ConfigError(f"{self.node_label}: the destination layout has {total} ranks but the job only "
                              f"{self.world}; destination ranks {_span(self.world, total - 1)} belong to no node")
        else:
            mine = list(self.node_ranks)
        size = -(-len(mine) // self.processes)
        return mine[self.my_index * size : (self.my_index + 1) * size]


def make_scope(rank: int, world: int, processes: int, npu_num_per_node: int | None, shared_disk: bool) -> Scope:
    """Check the job's shape (one line naming the node and ranks when it is wrong) and place this process."""
    world = _positive_int(world, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ConfigError(f"rank {rank!r} is outside the job's {world} ranks (0-{world - 1})")
    processes = _positive_int(processes, "transform_process_num")
    if not isinstance(shared_disk, bool):
        raise ConfigError(f"shared_disk must be true or false, got {shared_disk!r}")
    given = default_npu_num_per_node() if npu_num_per_node is None else npu_num_per_node
    npu = min(_positive_int(given, "npu_num_per_node"), world)
    if world % npu and npu_num_per_node is None and shared_disk:
        npu = world  # nodes do not matter with one disk for all: a guessed node size must not break such a job
    if world % npu:
        guessed = "" if npu_num_per_node is not None else \
            " (the default: this host's devices, DEVICE_NUM_PER_NODE or 8)"
        raise ConfigError(f"npu_num_per_node {npu}{guessed} does not divide the world size {world} (rank {rank}): "
                          "every node must hold the same number of devices; set npu_num_per_node to the devices of "
                          "one node")
    scope = Scope(rank, world, npu, processes, shared_disk)
    if shared_disk and world % processes:
        raise ConfigError(f"transform_process_num {processes} must divide the {world} processes (rank {rank})")
    if not shared_disk and npu % processes:
        raise ConfigError(f"transform_process_num {processes} must divide the {npu} devices of {scope.node_label}: "
                          "each of a node's converters takes an equal block of its ranks")
    return scope
