"""Orbax checkpoints, through orbax's public v1 API only (`metadata`, `load` with `partial_load`, `partial.save`).

Reading: orbax already reshards on read, so an orbax parameter is restored straight into the sharding the
destination needs, one parameter at a time (`partial_load`), never the whole tree. Writing: parameters are added
to the checkpoint in batches of at most `SAVE_BATCH_BYTES` with `partial.save` and committed by `finalize`, so the
output never needs the whole model in memory either; each array keeps its destination sharding, which orbax
records in the metadata.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, OutputError
from ..readfile import one_line

SAVE_BATCH_BYTES = 512 << 20  # bounded memory per partial save; big enough that per-save overhead is small



def is_orbax(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "_CHECKPOINT_METADATA").is_file()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


ORDER_KEY = "jaxreshard_param_order"  # custom metadata: the parameter order (orbax's own metadata is sorted)


def _metadata(path: Path) -> tuple[Any, list[str]]:
    """The checkpoint's metadata tree and the parameter order jaxreshard recorded (empty if another tool wrote it)."""
    import orbax.checkpoint.experimental.v1 as ocp

    try:
        meta = ocp.metadata(str(Path(path).absolute()))  # orbax refuses relative paths
        tree = meta.metadata
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all mean "not a readable checkpoint"
        raise FormatError(f"{path}: not a readable orbax checkpoint: {one_line(e)}") from None
    broken = [n for n, m in _flatten(tree).items() if m is None or not hasattr(m, "shape")] if tree else ["(all)"]
    if broken:
        raise FormatError(f"{path}: damaged orbax checkpoint: no array metadata for {broken[:5]}")
    order = (getattr(meta, "custom_metadata", None) or {}).get(ORDER_KEY) or []
    return tree, [str(n) for n in order]


def read_orbax_metadata(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Parameter name -> (shape, dtype), in the order they were written when jaxreshard wrote the checkpoint
    (nested keys joined with '.')."""
    tree, order = _metadata(path)
    flat = {name: (tuple(m.shape), np.dtype(m.dtype)) for name, m in _flatten(tree).items()}
    first = [n for n in order if n in flat]
    return {n: flat[n] for n in [*first, *(n for n in flat if n not in set(first))]}


def _nest(flat: Mapping[str, Any], keys: Mapping[str, tuple[str, ...]]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        node = out
        path = keys[name]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


class OrbaxSource:
    """Restores single parameters of an orbax checkpoint into any sharding."""

    def __init__(self, path: Path):

        self.path = Path(path).absolute()  # orbax refuses relative paths
        self._keys = _key_paths(_metadata(self.path)[0])
        self.params = read_orbax_metadata(self.path)

    def restore(self, param: str, sharding: Any, dtype: np.dtype) -> Any:
        import jax
        import orbax.checkpoint.experimental.v1 as ocp

        shape, _ = self.params[param]
        ctx = ocp.Context()
        ctx.pytree.loading.partial_load = True  # restore this one parameter, not the whole tree
        try:
            with ctx, x64(np.dtype(dtype).itemsize == 8):
                target = _nest({param: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)}, self._keys)
                restored = ocp.load(str(self.path), target)
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{self.path}: restoring parameter {param!r} failed: {one_line(e)}") from None
        return _flatten(restored)[param]


@contextlib.contextmanager
def x64(needed: bool):
    """64-bit types for the duration of an orbax call. JAX's `enable_x64` context is thread-local and orbax
    works in its own threads, so the global flag is set and restored (only when a 64-bit array needs it)."""
    import jax

    before = bool(jax.config.read("jax_enable_x64"))
    if needed and not before:
        jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        if needed and not before:
            jax.config.update("jax_enable_x64", False)


def _key_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    if isinstance(tree, Mapping):
        out: dict[str, tuple[str, ...]] = {}
        for key, value in tree.items():
            out.update(_key_paths(value, (*prefix, str(key))))
        return out
    return {".".join(prefix): prefix}


class OrbaxWriter:
    """The writer of one orbax checkpoint (the format's `RankWriter`: `write`, `close`, `abort`), in `dst_dir`.

    Whole arrays (each carrying its destination sharding) are added in batches of at most `SAVE_BATCH_BYTES`
    with `partial.save`; `close` finalizes the checkpoint. `dst_dir` is the caller's temporary folder, committed
    by `fsutil.atomic_output` like every other output: orbax wants a path of its own that does not exist yet,
    so it writes into a subfolder whose files `close` moves up.
    """

    def __init__(self, dst_dir: Path, order: list[str]):
        self._dst_dir = Path(dst_dir).absolute()  # orbax refuses relative paths
        self.path = self._dst_dir / "checkpoint"
        self._order = order
        self._batch: dict[str, Any] = {}
        self._bytes = 0
        self._written = 0

    def write(self, param: str, array: Any) -> None:
        self._batch[param] = array
        self._bytes += array.nbytes
        if self._bytes >= SAVE_BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        import orbax.checkpoint.experimental.v1 as ocp

        if self._batch:
            metadata: dict[str, Any] = {ORDER_KEY: self._order}
            with self._writing():
                ocp.partial.save(str(self.path), self._batch, custom_metadata=metadata)
            self._written += len(self._batch)
            self._batch, self._bytes = {}, 0

    def close(self) -> dict[Path, Any]:
        """Finalize the checkpoint and move its files into `dst_dir`; no per-file records (orbax's own)."""
        import orbax.checkpoint.experimental.v1 as ocp

        self._flush()
        if self._written:
            with self._writing():
                ocp.partial.finalize(str(self.path))
        if self.path.is_dir():
            inner = self._dst_dir / ".orbax-checkpoint"  # so a child named "checkpoint" can move up too
            os.rename(self.path, inner)
            for child in inner.iterdir():
                os.rename(child, self._dst_dir / child.name)
            inner.rmdir()
        return {}

    @contextlib.contextmanager
    def _writing(self):
        """orbax (tensorstore) reports a full disk, a quota or a read-only folder as a ValueError or OSError
        carrying the OS's words: the destination's fault, exit 2 naming it, not a traceback. Its worker
        threads also log each such failure with a traceback through absl: kept quiet here, the error says it."""
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.CRITICAL)
        try:
            yield
        except (OSError, ValueError) as e:
            raise OutputError(f"writing the orbax checkpoint {self.path} failed: {one_line(e)}; free space (or "
                              "quota) or choose another destination") from None
        finally:
            absl.setLevel(level)

    def abort(self) -> None:
        self._batch, self._bytes = {}, 0  # the caller's atomic_output removes the temporary folder
