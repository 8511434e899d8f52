"""`jaxreshard strategy`: MindSpore strategy files for a native layout and a checkpoint's parameters."""

from __future__ import annotations

from dataclasses import dataclass

from .. import api
from . import common
from .options import Command, option


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategyOptions:
    src: str = common.src()
    layout: str = option("the native layout YAML to write MindSpore strategy files for")
    out: str = option("the directory to write the strategy files into")
    overwrite: bool = common.overwrite()
    quiet: bool = common.quiet()


def run_strategy(opts: StrategyOptions) -> int:
    files = api.save_strategy(opts.src, opts.layout, opts.out, overwrite=opts.overwrite)
    print(f"wrote {len(files)} strategy file(s) to {opts.out}")
    return 0


COMMAND = Command("strategy", StrategyOptions, run_strategy,
                  "write MindSpore strategy files for a native layout and a checkpoint's parameters")
