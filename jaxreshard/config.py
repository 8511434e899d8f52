"""Job options: one frozen dataclass whose fields are both the CLI flags and the YAML config keys.

`--src-layout` on the command line is `src_layout:` in a config file; help texts live in the field metadata,
so the two can never drift apart. Unknown config keys are rejected with the list of valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

TASKS = ("convert", "plan", "inspect", "strategy", "merge-lora", "unify", "quickstart", "verify")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True, slots=True)
class JobOptions:
    src: str | None = _opt(None, "source checkpoint: a file, a Hugging Face directory, or a folder of rank_<n>/")
    dst: str | None = _opt(None, "destination directory (written as DST/rank_<r>/<prefix><r>.safetensors)")
    src_layout: str | None = _opt(None, "native layout YAML the source was saved with (none = complete source)")
    dst_layout: str | None = _opt(None, "native layout YAML to produce (none = one complete checkpoint)")
    src_strategy: str | None = _opt(None, "MindSpore strategy file or directory the source was saved with")
    dst_strategy: str | None = _opt(None, "MindSpore strategy file or directory to produce")
    output_format: str | None = _opt(None, "ckpt or safetensors (default: the source's format)")
    prefix: str = _opt("checkpoint_", "output file name prefix: rank_<r>/<prefix><r>.safetensors")
    dtype: str | None = _opt(None, "cast floating-point tensors to this dtype (bf16, fp16, fp32, fp64); default: copy bytes")
    hf: bool = _opt(False, "write a complete destination as Hugging Face model-0000i-of-0000n.safetensors + index")
    max_file_size: str | None = _opt(None, "with --hf: largest part file, e.g. 5GB or 500MiB")
    ranks: str | None = _opt(None, "write only these destination ranks, e.g. 0-3,8 (each node its own share)")
    process_num: str | None = _opt(None, "convert with N processes, each a contiguous block of ranks (N divides them)")
    coordinator_address: str | None = _opt(None, "multi-host: host:port of process 0 (jax.distributed)")
    num_processes: str | None = _opt(None, "multi-host: number of processes in the jax.distributed job")
    process_id: str | None = _opt(None, "multi-host: this process's index in the jax.distributed job")
    overwrite: bool = _opt(False, "replace an existing non-empty destination (only after the new one is complete)")
    resume: bool = _opt(False, "after a crash: keep the rank files the interrupted run of this same conversion "
                        "completed (sizes and SHA-256 checked again) and write only the rest")
    verify_crc: bool = _opt(False, "check the crc_num trailer of MindSpore .ckpt sources before converting")
    exact_replicas: bool = _opt(False, "read every block from the replica MindSpore would (only matters when "
                                "data-parallel copies differ); default: each block read once")
    quiet: bool = _opt(False, "no progress bar", short="-q")
    verify: bool = _opt(False, "compare the output with the source (jaxreshard verify) before committing it")
    check_replicas: bool = _opt(False, "verify: also compare the data-parallel replicas within a checkpoint")
    adapter: str | None = _opt(None, "merge-lora: a PEFT adapter folder (adapter_model.safetensors + adapter_config.json)")
    lora_scaling: str | None = _opt(None, "merge-lora: the LoRA scale s in W + s*B@A (default: from adapter_config.json)")
    keep_optimizer_states: bool = _opt(False, "merge-lora: keep adam_m/adam_v/accu_grads states (dropped by default)")
    fan_in_fan_out: bool = _opt(False, "merge-lora: base weights are stored (in, out) (PEFT fan_in_fan_out)")
    file_suffix: str | None = _opt(None, "unify: in each rank folder take the one *<suffix>.safetensors")
    has_redundancy: str | None = _opt(None, "unify: true if every rank still holds its replicas (checked against "
                                      "the files' remove_redundancy metadata)")
    filter_out_param_prefix: tuple[str, ...] = _opt((), "unify: drop parameters whose names start with these",
                                                    nargs="+")
    layout: str | None = _opt(None, "strategy only: the native layout YAML to write MindSpore strategy files for")
    out: str | None = _opt(None, "strategy only: the directory to write the strategy files into")
    workdir: str = _opt("quickstart_output", "quickstart only: where the example and its conversions go")
    layouts: tuple[str, ...] = _opt((), "quickstart only: the layouts to convert through, in order", nargs="+")


_CONVERT = ("convert", "plan")
_LORA = ("merge-lora",)
_UNIFY = ("unify",)
APPLIES_TO: dict[str, tuple[str, ...]] = {  # which subcommands show each option (YAML accepts them all);
    # `plan` takes every option `convert` takes, so a dry run is the same command line
    "src": TASKS, "quiet": TASKS,
    "dst": (*_CONVERT, *_LORA, *_UNIFY, "verify"),
    "src_layout": (*_CONVERT, "inspect", *_LORA, *_UNIFY, "verify"),
    "src_strategy": (*_CONVERT, "inspect", *_LORA, *_UNIFY, "verify"),
    "dst_layout": (*_CONVERT, *_LORA, "verify"), "dst_strategy": (*_CONVERT, *_LORA, "verify"),
    "verify": _CONVERT, "check_replicas": ("verify",),
    "output_format": (*_CONVERT, *_LORA), "prefix": (*_CONVERT, *_LORA),
    "dtype": _CONVERT, "ranks": _CONVERT, "verify_crc": _CONVERT, "resume": ("convert",), "exact_replicas": _CONVERT,
    "hf": (*_CONVERT, *_LORA), "max_file_size": (*_CONVERT, *_LORA, *_UNIFY),
    "process_num": (*_CONVERT, *_LORA, *_UNIFY),
    "coordinator_address": _CONVERT, "num_processes": _CONVERT, "process_id": _CONVERT,
    "overwrite": (*_CONVERT, "strategy", *_LORA, *_UNIFY, "quickstart"),
    "adapter": _LORA, "lora_scaling": _LORA, "keep_optimizer_states": _LORA, "fan_in_fan_out": _LORA,
    "file_suffix": _UNIFY, "has_redundancy": _UNIFY, "filter_out_param_prefix": _UNIFY,
    "layout": ("strategy",), "out": ("strategy",), "workdir": ("quickstart",), "layouts": ("quickstart",),
}


def add_arguments(parser: argparse.ArgumentParser, task: str, *, skip: tuple[str, ...] = ()) -> None:
    """Add a `--flag` for each `JobOptions` field that applies to `task` (defaults are suppressed so YAML values
    are not masked)."""
    for f in dataclasses.fields(JobOptions):
        if f.name in skip or task not in APPLIES_TO[f.name]:
            continue
        flags = [f"--{f.name.replace('_', '-')}"]
        if "short" in f.metadata:
            flags.insert(0, f.metadata["short"])
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "default": argparse.SUPPRESS, "dest": f.name}
        if f.type in ("bool",):
            kwargs["action"] = "store_true"
        elif "nargs" in f.metadata:
            kwargs["nargs"] = f.metadata["nargs"]
        parser.add_argument(*flags, **kwargs)


def _scalar(key: str, value: Any, source: str) -> str:
    """A scalar option value as text; a list or mapping (or a YAML alias expanding to one) is refused."""
    if isinstance(value, (str, int, float)):  # bools too: `has_redundancy: true` is the text "True"
        return str(value)
    raise ConfigError(f"{source}: {key} must be a single value, got a {type(value).__name__} {value!r:.80}")


def options_from(values: dict[str, Any], source: str) -> JobOptions:
    """Build options from a dict of field values (CLI namespace or YAML), rejecting unknown keys and values of
    the wrong kind (a list where one value is wanted, a non-boolean flag)."""
    valid = {f.name: f for f in dataclasses.fields(JobOptions)}
    unknown = sorted(str(k) for k in values if k not in valid)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; valid keys are task, {', '.join(valid)}")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        kind = valid[key].type
        if kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r:.80}")
        if kind == "tuple[str, ...]":
            items = [value] if isinstance(value, str) else value or ()
            if not isinstance(items, (list, tuple)):
                raise ConfigError(f"{source}: {key} must be a list of values, got {value!r:.80}")
            value = tuple(_scalar(key, v, source) for v in items)
        elif value is not None and kind != "bool":
            value = _scalar(key, value, source)
        clean[key] = value
    return JobOptions(**clean)


def read_job(path: str | Path) -> tuple[str, JobOptions]:
    """Read a YAML job file: `task:` (convert, plan, inspect, quickstart) plus option keys (a regular UTF-8
    file, size-, depth- and alias-capped: see `yamlfile`)."""
    from .yamlfile import load_yaml

    data = load_yaml(path, ConfigError, "job config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job config must be a mapping of option names to values")
    data = dict(data)
    task = data.pop("task", "convert")
    if not isinstance(task, str) or task not in TASKS:
        raise ConfigError(f"{path}: task {task!r:.80} is unknown; use one of {', '.join(TASKS)}")
    return task, options_from(data, str(path))
