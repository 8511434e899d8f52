"""`jaxreshard inspect SRC`: parameters, shapes, dtypes, bytes, and which rank holds which block."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import api, describe, remote
from ..errors import ConfigError
from ..formats import open_source
from ..formats.mindspore_strategy import read_strategy
from ..formats.orbax_io import is_orbax
from ..formats.untrusted import NotACheckpoint
from ..srccheck import source_layout
from . import common
from .options import Command, Positional


@dataclass(frozen=True, slots=True, kw_only=True)
class InspectOptions:
    src: str = common.src("checkpoint or strategy file to inspect")
    src_layout: str | None = common.src_layout()
    src_strategy: str | None = common.src_strategy()
    quiet: bool = common.quiet()


def describe_path(opts: InspectOptions) -> Iterable[str]:
    """Lines describing a checkpoint (with its layout or strategy, if given), an orbax checkpoint or a strategy
    file. A strategy is tried only when the path is in no checkpoint format at all, so a damaged checkpoint is
    reported as damaged, not as "not a MindSpore strategy file"."""
    if is_orbax(Path(opts.src)):
        if opts.src_layout is not None or opts.src_strategy is not None:
            raise ConfigError(f"{opts.src}: an orbax checkpoint holds whole arrays; it takes no source layout")
        return describe.describe_orbax(Path(opts.src))
    try:
        source = open_source(opts.src)
    except NotACheckpoint:  # perhaps a strategy file (also named *.ckpt) or folder
        return describe.describe_strategy(read_strategy(Path(opts.src)))
    if opts.src_layout is None and opts.src_strategy is None:  # by its manifest's layout, else rank by rank
        return describe.describe_source(source, source_layout(source, None))
    return describe.describe_source(source, api.native_layouts(source, opts.src_layout, opts.src_strategy)[0])


@remote.option_views(sources=("src",))
def run_inspect(opts: InspectOptions) -> int:
    for line in describe_path(opts):
        print(remote.display(line))
    return 0


COMMAND = Command("inspect", InspectOptions, run_inspect,
                  "list parameters, shapes, dtypes, bytes, and which rank holds which block",
                  Positional("src", "src", "checkpoint or strategy file to inspect", required=True))
