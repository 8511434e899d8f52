"""Command line: `jaxreshard COMMAND ...` and `jaxreshard --config job.yaml`: parse, dispatch, signals, exit codes.

The commands, their options and their handlers are in `jaxreshard.commands` (the command table).
Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the file, parameter or rank);
1 an internal error (with a traceback); 128 + N when interrupted by signal N (SIGINT, SIGTERM, SIGHUP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from .commands import make_parser, options_from_args, read_job, run
from .errors import ConfigError, JaxreshardError
from .logs import configure_logging


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
        args = make_parser().parse_args(argv)
    except SystemExit as e:  # argparse usage errors exit 2 already; keep --help's 0
        return int(e.code or 0)
    values = {k: v for k, v in vars(args).items() if k not in ("config", "task")}
    quiet = bool(values.get("quiet"))
    configure_logging(quiet=quiet)
    try:
        if args.config:
            if args.task:
                raise ConfigError("give either --config or a subcommand, not both")
            task, opts = read_job(args.config)
            if quiet and hasattr(opts, "quiet"):  # `--config job.yaml -q`
                opts = dataclasses.replace(opts, quiet=True)
        elif args.task:
            task, opts = args.task, options_from_args(args.task, values)
        else:
            make_parser().print_help(sys.stderr)
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
