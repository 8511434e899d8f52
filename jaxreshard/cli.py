"""Command line: `jaxreshard convert|plan|inspect|quickstart ...` and `jaxreshard --config job.yaml`.

Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the file, parameter or rank);
1 an internal error (with a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from .caps import MAX_PROCESSES, MAX_RANKS
from .config import JobOptions, add_arguments, options_from, read_job
from .errors import ConfigError, JaxreshardError

log = logging.getLogger("jaxreshard")
_INTEGER = re.compile(r"[+-]?[0-9]+")


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
        ("verify", "prove two checkpoints hold the same tensors (--src A --dst B), or check one against its manifest"),
    ):
        p = sub.add_parser(task, help=help_text, description=help_text)
        if task == "inspect":
            p.add_argument("src", help="checkpoint or strategy file to inspect")
            add_arguments(p, task, skip=("src",))
        elif task == "verify":  # `verify B` = `verify --dst B`: B alone against its manifest, or --src A with it
            p.add_argument("checkpoint", nargs="?", default=argparse.SUPPRESS,
                           help="the checkpoint to check (the same as --dst)")
            add_arguments(p, task)
        else:
            add_arguments(p, task)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler, `timeout`, a closed terminal): handled like Ctrl-C, so every temporary
    is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once (the next run cleans up)
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Terminated` while the block runs (main thread only; restored afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    with _signals_interrupt():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse usage errors exit 2 already; keep --help's 0
        return int(e.code or 0)
    values = {k: v for k, v in vars(args).items() if k not in ("config", "task", "checkpoint")}
    if "checkpoint" in vars(args):
        if "dst" in values:
            return _usage("verify: give the checkpoint to check as a positional argument or as --dst, not both")
        values["dst"] = args.checkpoint
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
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"jaxreshard: interrupted by {signal.Signals(signum).name}; this run's temporary files were removed",
              file=sys.stderr)
        return 128 + signum


def _fields(opts: JobOptions) -> dict[str, object]:
    return {name: getattr(opts, name) for name in JobOptions.__dataclass_fields__}


def _require(opts: JobOptions, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(opts, n) is None]
    if missing:
        raise ConfigError(f"missing required option(s) {', '.join(missing)}")


_BOUNDS = {"--process-num": (1, MAX_PROCESSES), "--num-processes": (1, MAX_RANKS), "--process-id": (0, MAX_RANKS - 1)}


def _int(value: str | None, flag: str, default: int | None = 1) -> int | None:
    """An integer flag within its bounds (`_BOUNDS`), written in ASCII digits (int() would also take '٣' or
    '1_0'), so a zero, negative or absurd count is refused before anything runs."""
    if value is None:
        return default
    minimum, maximum = _BOUNDS.get(flag, (1, MAX_PROCESSES))
    text = str(value).strip()
    if not _INTEGER.fullmatch(text):
        raise ConfigError(f"{flag} must be an integer, got {str(value)[:40]!r}")
    number = int(text) if len(text) <= 12 else maximum + 1
    if not minimum <= number <= maximum:
        raise ConfigError(f"{flag} must be an integer in {minimum}..{maximum}, got {text[:40]}")
    return number


def _size(value: str | None, flag: str) -> str | None:
    """A size flag (5GB, 500MiB, 1000) checked to be at least one byte; passed on as written."""
    from .api import parse_size

    if value is not None and (parse_size(value) or 0) < 1:
        raise ConfigError(f"{flag} must be at least 1 byte, got {value!r:.40}")
    return value


def _inspect(opts: JobOptions):
    """Lines describing a checkpoint (with its layout or strategy, if given), an orbax checkpoint or a strategy
    file. A strategy is tried only when the path is in no checkpoint format at all, so a damaged checkpoint is
    reported as damaged, not as "not a MindSpore strategy file"."""
    from . import api, describe
    from .formats import open_source
    from .formats.mindspore_strategy import read_strategy
    from .formats.orbax_io import is_orbax
    from .formats.untrusted import NotACheckpoint

    if is_orbax(Path(opts.src)):
        if opts.src_layout is not None or opts.src_strategy is not None:
            raise ConfigError(f"{opts.src}: an orbax checkpoint holds whole arrays; it takes no source layout")
        return describe.describe_orbax(Path(opts.src))
    try:
        source = open_source(opts.src)
    except NotACheckpoint:  # perhaps a strategy file (also named *.ckpt) or folder
        return describe.describe_strategy(read_strategy(Path(opts.src)))
    if opts.src_layout is None and opts.src_strategy is None:  # by its manifest's layout, else rank by rank
        from .srccheck import source_layout

        return describe.describe_source(source, source_layout(source, None))
    return describe.describe_source(source, api.native_layouts(source, opts.src_layout, opts.src_strategy)[0])


def _float(value: str | None, flag: str) -> float | None:
    """A finite number (nan and inf would silently fill the output with nan/inf)."""
    try:
        number = None if value is None else float(value)
    except ValueError:
        raise ConfigError(f"{flag} must be a number, got {str(value)[:40]!r}") from None
    if number is not None and not math.isfinite(number):
        raise ConfigError(f"{flag} must be a finite number, got {str(value)[:40]!r}")
    return number


def _merge(task: str, opts: JobOptions) -> int:
    from . import api, merge
    from .fsutil import check_destination
    from .mindformers.compat import parse_bool

    _require(opts, "dst")
    if task == "merge-lora":
        job = merge.plan_merge_lora(
            opts.src, adapter=opts.adapter, src_layout=opts.src_layout, src_strategy=opts.src_strategy,
            dst_layout=opts.dst_layout, dst_strategy=opts.dst_strategy,
            lora_scaling=_float(opts.lora_scaling, "--lora-scaling"), keep_optimizer_states=opts.keep_optimizer_states,
            fan_in_fan_out=opts.fan_in_fan_out, prefix=opts.prefix, output_format=opts.output_format,
        )  # fmt: skip
        check_destination(Path(opts.dst), merge.adapter_reads(opts.adapter), overwrite=True)  # overlap only
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


def _usage(message: str) -> int:
    print(f"jaxreshard: error: {message}", file=sys.stderr)
    return 2


def _verify(opts: JobOptions) -> int:
    """`verify --src A --dst B` compares; one checkpoint alone (either flag) is checked on its own."""
    from .verify import verify

    if opts.src is not None and opts.dst is not None:
        report = verify(opts.src, opts.dst, src_layout=opts.src_layout, src_strategy=opts.src_strategy,
                        dst_layout=opts.dst_layout, dst_strategy=opts.dst_strategy,
                        check_replicas=opts.check_replicas)
    elif opts.src is None and opts.dst is None:
        raise ConfigError("verify: give a checkpoint (jaxreshard verify B), or two to compare (--src A --dst B)")
    else:
        given = [f for f in ("src_layout", "src_strategy", "dst_layout", "dst_strategy") if getattr(opts, f)]
        if len(given) > 1:
            flags = ", ".join("--" + g.replace("_", "-") for g in given)
            raise ConfigError(f"verify: one checkpoint takes one layout or strategy; got {flags}")
        layout = opts.src_layout or opts.dst_layout
        strategy = opts.src_strategy or opts.dst_strategy
        report = verify(opts.src or opts.dst, src_layout=layout, src_strategy=strategy,
                        check_replicas=opts.check_replicas)
    print(report.summary())
    return 0


def run(task: str, opts: JobOptions) -> int:
    from . import api, describe

    _size(opts.max_file_size, "--max-file-size")  # before any work: a size of 0 would plan, then fail late

    if task == "quickstart":
        from .quickstart import run_quickstart

        return run_quickstart(opts)
    if task == "verify":
        return _verify(opts)
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
        process_id=_int(opts.process_id, "--process-id", None), verify=opts.verify, resume=opts.resume, **common,
    )  # fmt: skip
    rate = report.stats.write_bytes / max(report.seconds, 1e-9)
    print(
        f"wrote {len(report.files)} file(s), {describe.human_bytes(report.stats.write_bytes)} to {report.dst} "
        f"in {report.seconds:.2f} s ({describe.human_bytes(rate)}/s)"
    )
    return 0
