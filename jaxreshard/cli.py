"""Command line: `jaxreshard convert|plan|inspect|quickstart ...` and `jaxreshard --config job.yaml`.

Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the file, parameter or rank);
1 an internal error (with a traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import JobOptions, add_arguments, options_from, read_job
from .errors import ConfigError, JaxreshardError

log = logging.getLogger("jaxreshard")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxreshard",
        description="Split, reshard and merge checkpoints between parallel layouts (JAX meshes).",
    )
    parser.add_argument("--config", help="YAML job file: task (convert|plan|inspect|quickstart) + option keys")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")
    sub = parser.add_subparsers(dest="task")
    for task, help_text in (
        ("convert", "convert a checkpoint into another layout (split, reshard or merge)"),
        ("plan", "print what convert would read and write, per rank; writes nothing"),
        ("inspect", "list parameters, shapes, dtypes, bytes, and which rank holds which block"),
        ("strategy", "write MindSpore strategy files for a native layout and a checkpoint's parameters"),
        ("merge-lora", "fold LoRA branches into their base weights (complete or any destination layout)"),
        ("unify", "merge distributed safetensors into complete Hugging Face-style part files + index"),
        ("quickstart", "run the built-in example: split, reshard, merge and check the bytes"),
    ):
        p = sub.add_parser(task, help=help_text, description=help_text)
        if task == "inspect":
            p.add_argument("src", help="checkpoint or strategy file to inspect")
            add_arguments(p, task, skip=("src",))
        else:
            add_arguments(p, task)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse usage errors exit 2 already; keep --help's 0
        return int(e.code or 0)
    values = {k: v for k, v in vars(args).items() if k not in ("config", "task")}
    quiet = bool(values.get("quiet"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        if args.config:
            if args.task:
                raise ConfigError("give either --config or a subcommand, not both")
            task, opts = read_job(args.config)
            if quiet:
                opts = options_from({**_fields(opts), "quiet": True}, args.config)
        elif args.task:
            task, opts = args.task, options_from(values, "command line")
        else:
            _parser().print_help(sys.stderr)
            return 2
        return run(task, opts)
    except JaxreshardError as e:
        print(f"jaxreshard: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `jaxreshard inspect ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt:
        print("jaxreshard: interrupted; no output was left behind", file=sys.stderr)
        return 130


def _fields(opts: JobOptions) -> dict[str, object]:
    return {name: getattr(opts, name) for name in JobOptions.__dataclass_fields__}


def _require(opts: JobOptions, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(opts, n) is None]
    if missing:
        raise ConfigError(f"missing required option(s) {', '.join(missing)}")


def _int(value: str | None, flag: str, default: int | None = 1) -> int | None:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{flag} must be an integer, got {value!r}") from None


def _inspect(opts: JobOptions):
    """Lines describing a checkpoint (with its layout or strategy, if given) or a strategy file."""
    from . import api, describe
    from .errors import FormatError
    from .formats import open_source
    from .formats.mindspore_strategy import read_strategy

    try:
        source = open_source(opts.src)
    except FormatError:
        try:  # not a checkpoint: perhaps a strategy file (also named *.ckpt) or folder
            strategy = read_strategy(Path(opts.src))
        except FormatError:
            raise
        return describe.describe_strategy(strategy)
    if opts.src_layout is None and opts.src_strategy is None:  # by its manifest's layout, else rank by rank
        from .srccheck import source_layout

        return describe.describe_source(source, source_layout(source, None))
    return describe.describe_source(source, api.native_layouts(source, opts.src_layout, opts.src_strategy)[0])


def _float(value: str | None, flag: str) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        raise ConfigError(f"{flag} must be a number, got {value!r}") from None


def _merge(task: str, opts: JobOptions) -> int:
    from . import api, merge
    from .compat import parse_bool

    _require(opts, "dst")
    if task == "merge-lora":
        job = merge.plan_merge_lora(
            opts.src, adapter=opts.adapter, src_layout=opts.src_layout, src_strategy=opts.src_strategy,
            dst_layout=opts.dst_layout, dst_strategy=opts.dst_strategy,
            lora_scaling=_float(opts.lora_scaling, "--lora-scaling"), keep_optimizer_states=opts.keep_optimizer_states,
            fan_in_fan_out=opts.fan_in_fan_out, prefix=opts.prefix, output_format=opts.output_format,
        )  # fmt: skip
        report = api.write_job(job, Path(opts.dst), overwrite=opts.overwrite, progress=not opts.quiet, hf=opts.hf,
                               max_file_bytes=api.parse_size(opts.max_file_size),
                               process_num=_int(opts.process_num, "--process-num"))
        print(f"wrote {len(report.files)} file(s) to {report.dst}")
        return 0
    try:
        redundancy = None if opts.has_redundancy is None else parse_bool(opts.has_redundancy)
    except ValueError:
        raise ConfigError(f"--has-redundancy must be true or false, got {opts.has_redundancy!r}") from None
    job = merge.plan_unify(opts.src, src_layout=opts.src_layout, src_strategy=opts.src_strategy,
                           file_suffix=opts.file_suffix, has_redundancy=redundancy,
                           filter_out_param_prefix=opts.filter_out_param_prefix)
    files = merge.write_unified(job, Path(opts.dst), max_file_bytes=api.parse_size(opts.max_file_size or "5GB"),
                                process_num=_int(opts.process_num, "--process-num"), overwrite=opts.overwrite)
    print(f"wrote {len(files)} file(s) to {opts.dst}")
    return 0


def run(task: str, opts: JobOptions) -> int:
    from . import api, describe

    if task == "quickstart":
        from .quickstart import run_quickstart

        return run_quickstart(opts)
    _require(opts, "src")
    if task == "strategy":
        _require(opts, "layout", "out")
        files = api.save_strategy(opts.src, opts.layout, opts.out, overwrite=opts.overwrite)
        print(f"wrote {len(files)} strategy file(s) to {opts.out}")
        return 0
    if task in ("merge-lora", "unify"):
        return _merge(task, opts)
    if task == "inspect":
        for line in _inspect(opts):
            print(line)
        return 0
    common = dict(
        src_layout=opts.src_layout, dst_layout=opts.dst_layout, src_strategy=opts.src_strategy,
        dst_strategy=opts.dst_strategy, prefix=opts.prefix, dtype=opts.dtype, output_format=opts.output_format,
        exact_replicas=opts.exact_replicas, verify_crc=opts.verify_crc,
    )  # fmt: skip
    if task == "plan":
        from .run import parse_ranks

        for line in describe.describe_plan(api.plan_conversion(opts.src, ranks=parse_ranks(opts.ranks), **common).plan):
            print(line)
        return 0
    _require(opts, "dst")
    report = api.convert(
        opts.src, opts.dst, hf=opts.hf, max_file_size=opts.max_file_size, overwrite=opts.overwrite,
        progress=not opts.quiet, ranks=opts.ranks, process_num=_int(opts.process_num, "--process-num"),
        coordinator_address=opts.coordinator_address, num_processes=_int(opts.num_processes, "--num-processes", None),
        process_id=_int(opts.process_id, "--process-id", None), resume=opts.resume, **common,
    )  # fmt: skip
    rate = report.stats.write_bytes / max(report.seconds, 1e-9)
    print(
        f"wrote {len(report.files)} file(s), {describe.human_bytes(report.stats.write_bytes)} to {report.dst} "
        f"in {report.seconds:.2f} s ({describe.human_bytes(rate)}/s)"
    )
    return 0
