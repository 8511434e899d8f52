"""Small helpers shared by the tests (expected values are still computed in each test, independently)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxreshard.formats.manifest import MANIFEST_NAME


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path, with its bytes."""
    files = (p for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != MANIFEST_NAME)
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def nest(flat: dict) -> dict:
    """{'a.b': x} -> {'a': {'b': x}}."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *head, last = name.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def block_slices(shape, spec, mesh: dict[str, int], coords: dict[str, int]) -> tuple[slice, ...]:
    """The block of a tensor a device at mesh `coords` holds under a PartitionSpec-like `spec` (entries: an axis,
    None, or a list of axes, major first), computed from the contract independently of jaxreshard's code."""
    slices = []
    for dim, size in enumerate(shape):
        entry = spec[dim] if dim < len(spec) else None
        axes = [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
        k, c = 1, 0
        for axis in axes:
            k *= mesh[axis]
            c = c * mesh[axis] + int(coords[axis])
        slices.append(slice(c * (size // k), (c + 1) * (size // k)))
    return tuple(slices)


def rank_coords(mesh: dict[str, int], local_rank: int) -> dict[str, int]:
    """Row-major coordinates of a local rank on a mesh."""
    return dict(zip(mesh, (int(c) for c in np.unravel_index(local_rank, list(mesh.values())))))


def one_line_error(call: Callable[[], object], *words: str, kind: type[Exception] | None = None) -> str:
    """Run `call`, which must raise `kind` (default `FormatError`) with a one-line message holding every word;
    returns the message."""
    import pytest

    from jaxreshard.errors import FormatError

    with pytest.raises(kind or FormatError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message
