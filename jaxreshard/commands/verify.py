"""`jaxreshard verify`: two checkpoints hold the same tensors (--src A --dst B), or one matches its manifest."""

from __future__ import annotations

from dataclasses import dataclass

from .. import remote
from ..errors import ConfigError
from ..verify import verify
from . import common
from .options import Command, Positional, flag, flag_name


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyOptions:
    src: str | None = common.src("the checkpoint to compare with (or, alone, the checkpoint to check)",
                                     default=None)
    dst: str | None = common.dst("the checkpoint to check", default=None)
    src_layout: str | None = common.src_layout()
    dst_layout: str | None = common.dst_layout()
    src_strategy: str | None = common.src_strategy()
    dst_strategy: str | None = common.dst_strategy()
    check_replicas: bool = flag("also compare the data-parallel replicas within a checkpoint")
    quiet: bool = common.quiet()


@remote.option_views(sources=("src", "dst"))
def run_verify(opts: VerifyOptions) -> int:
    """`verify --src A --dst B` compares; one checkpoint alone (either flag) is checked on its own."""
    if opts.src is not None and opts.dst is not None:
        report = verify(opts.src, opts.dst, src_layout=opts.src_layout, src_strategy=opts.src_strategy,
                        dst_layout=opts.dst_layout, dst_strategy=opts.dst_strategy,
                        check_replicas=opts.check_replicas)
    elif opts.src is None and opts.dst is None:
        raise ConfigError("verify: give a checkpoint (jaxreshard verify B), or two to compare (--src A --dst B)")
    else:
        given = [f for f in ("src_layout", "src_strategy", "dst_layout", "dst_strategy") if getattr(opts, f)]
        if len(given) > 1:
            flags = ", ".join(map(flag_name, given))
            raise ConfigError(f"verify: one checkpoint takes one layout or strategy; got {flags}")
        layout = opts.src_layout or opts.dst_layout
        strategy = opts.src_strategy or opts.dst_strategy
        checkpoint = opts.src or opts.dst
        assert checkpoint is not None  # exactly one of the two was given (the branches above)
        report = verify(checkpoint, src_layout=layout, src_strategy=strategy,
                        check_replicas=opts.check_replicas)
    print(remote.display(report.summary()))
    return 0


COMMAND = Command("verify", VerifyOptions, run_verify,
                  "prove two checkpoints hold the same tensors (--src A --dst B), or check one against its manifest",
                  Positional("dst", "checkpoint", "the checkpoint to check"))
