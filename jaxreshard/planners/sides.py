"""What a layout argument is: the planner is chosen by the value, not by the keyword it came in.

`src_layout` / `dst_layout` accept a native layout YAML path, a MindSpore strategy file or folder (detected by
content), a `LayoutLike`, a read `Strategy`, or `(jax Mesh, {name regex: PartitionSpec})`. The
`src_strategy` / `dst_strategy` keywords (and `--src-strategy` / `--dst-strategy`) are aliases that feed the
same path, marked `StrategyPath` so a path given as a strategy is always read as one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..formats.mindspore_strategy import Strategy, read_strategy
from ..layout import Layout, layout_from_mesh, read_layout
from ..mindspore import StrategyLayout
from ..plan import LayoutLike

SNIFF_BYTES = 4096  # enough of a file to tell a binary protobuf strategy from a YAML/JSON text layout
_TEXT_CONTROLS = {9, 10, 13}  # tab, newline, carriage return: the only control bytes a YAML layout has

Side = LayoutLike | Strategy | None
# What a `src_layout` / `dst_layout` argument may be (see the module docstring).
LayoutArg = LayoutLike | Strategy | str | Path | tuple[Any, Mapping[str, Any]] | None


@dataclass(frozen=True, slots=True)
class StrategyPath:
    """A path given as a MindSpore strategy (`--src-strategy`, `src_strategy=`): read as a strategy."""

    path: Path


def one_side(layout: Any, strategy: Any, side: str) -> Any:
    """The one layout argument of a side, from `*_layout` or its `*_strategy` alias (not both)."""
    if layout is not None and strategy is not None:
        raise ConfigError(f"give --{side}-layout or --{side}-strategy, not both")
    if strategy is None or isinstance(strategy, Strategy):
        return layout if strategy is None else strategy
    return StrategyPath(Path(strategy))


def is_strategy_path(path: Path) -> bool:
    """A MindSpore strategy by content: a folder of strategy files, binary protobuf, or JSON with
    `parallel_layout_item`; YAML layouts are text. Unreadable paths are left to the layout reader's message."""
    if path.is_dir():
        return True
    if path.suffix in (".yaml", ".yml"):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return False
    if any(b < 32 and b not in _TEXT_CONTROLS for b in head):
        return True
    return b'"parallel_layout_item"' in head or b'"parallel_strategy_item"' in head


def read_side(arg: Any) -> Side:
    """The layout or strategy an argument describes (see the module docstring)."""
    if arg is None or isinstance(arg, (Layout, Strategy)):
        return arg
    if isinstance(arg, StrategyPath):
        return read_strategy(arg.path)
    if isinstance(arg, (str, Path)):
        return read_strategy(Path(arg)) if is_strategy_path(Path(arg)) else read_layout(arg)
    if isinstance(arg, tuple) and len(arg) == 2:
        return layout_from_mesh(arg[0], arg[1])
    if hasattr(arg, "resolve") and hasattr(arg, "num_ranks"):
        return arg  # type: ignore[no-any-return]
    raise ConfigError(f"cannot use {arg!r} as a layout: give a YAML path, a MindSpore strategy file or folder, "
                      "a Layout, or (mesh, specs)")


def as_layout(side: Side, ndims: dict[str, int]) -> LayoutLike | None:
    """A side as a native `LayoutLike`: strategies read with native semantics (tensor ranks from `ndims`)."""
    return StrategyLayout(side, ndims) if isinstance(side, Strategy) else side
