"""`jaxreshard merge-lora`: fold LoRA branches into their base weights (complete or any destination layout)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import api, merge, remote
from ..fsutil import check_destination
from . import common
from .options import Command, flag, option, parse_number


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeLoraOptions:
    src: str = common.src()
    dst: str = common.dst()
    src_layout: str | None = common.src_layout()
    dst_layout: str | None = common.dst_layout()
    src_strategy: str | None = common.src_strategy()
    dst_strategy: str | None = common.dst_strategy()
    output_format: str | None = common.output_format()
    prefix: str = common.prefix()
    hf: bool = common.hf()
    max_file_size: int | None = common.max_file_size()
    workers: int = common.workers()
    overwrite: bool = common.overwrite()
    quiet: bool = common.quiet()
    adapter: str | None = option("a PEFT adapter folder (adapter_model.safetensors + adapter_config.json)",
                                 default=None)
    lora_scaling: float | None = option("the LoRA scale s in W + s*B@A (default: from adapter_config.json)",
                                        parse_number, None, metavar="S")
    keep_optimizer_states: bool = flag("keep adam_m/adam_v/accu_grads states (dropped by default)")
    fan_in_fan_out: bool = flag("base weights are stored (in, out) (PEFT fan_in_fan_out)")


@remote.option_views(sources=("src",), destination="dst")
def run_merge_lora(opts: MergeLoraOptions) -> int:
    job = merge.plan_merge_lora(
        opts.src, adapter=opts.adapter, src_layout=opts.src_layout, src_strategy=opts.src_strategy,
        dst_layout=opts.dst_layout, dst_strategy=opts.dst_strategy, lora_scaling=opts.lora_scaling,
        keep_optimizer_states=opts.keep_optimizer_states, fan_in_fan_out=opts.fan_in_fan_out, prefix=opts.prefix,
        output_format=opts.output_format,
    )  # fmt: skip
    check_destination(Path(opts.dst), merge.adapter_reads(opts.adapter), overwrite=True)  # overlap only
    report = api.write_job(job, Path(opts.dst), overwrite=opts.overwrite, progress=not opts.quiet, hf=opts.hf,
                           max_file_bytes=opts.max_file_size, process_num=opts.workers)
    print(f"wrote {len(report.files)} file(s) to {report.dst}")
    return 0


COMMAND = Command("merge-lora", MergeLoraOptions, run_merge_lora,
                  "fold LoRA branches into their base weights (complete or any destination layout)")
