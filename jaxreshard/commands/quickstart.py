"""`jaxreshard quickstart`: the built-in example (split, reshard, merge, and check the bytes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..quickstart import run_quickstart
from . import common
from .options import Command, option


@dataclass(frozen=True, slots=True, kw_only=True)
class QuickstartOptions:
    workdir: str = option("where the example and its conversions go", default="quickstart_output")
    layouts: tuple[str, ...] = option("the layouts to convert through, in order", default=(), many=True)
    overwrite: bool = common.overwrite()
    quiet: bool = common.quiet()


def run(opts: QuickstartOptions) -> int:
    run_quickstart(Path(opts.workdir), opts.layouts, overwrite=opts.overwrite, progress=not opts.quiet)
    return 0


COMMAND = Command("quickstart", QuickstartOptions, run,
                  "run the built-in example: split, reshard, merge and check the bytes")
