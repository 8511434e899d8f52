"""The command table: every `jaxreshard` subcommand, from which come the argument parser, the job-file keys and
the dispatch.

Adding a command = one new module in this package (an options dataclass whose fields are its flags and job
keys, a handler `options -> exit code`, and `COMMAND = Command(name, Options, handler, help)`) + one line in
`COMMANDS` below. Nothing else lists commands or options.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..yamlfile import load_yaml
from . import convert, inspect, merge_lora, quickstart, strategy, unify, verify
from .options import Command, add_arguments, build_options, flag_name, job_keys

COMMANDS: dict[str, Command] = {c.name: c for c in (
    convert.CONVERT,
    convert.PLAN,
    inspect.COMMAND,
    strategy.COMMAND,
    merge_lora.COMMAND,
    unify.COMMAND,
    quickstart.COMMAND,
    verify.COMMAND,
)}  # fmt: skip
DEFAULT_TASK = "convert"  # a job file without `task:`
POSITIONAL = "positional"  # the parser's destination for a command's positional argument


def make_parser() -> argparse.ArgumentParser:
    """`jaxreshard [--config JOB] [-q] COMMAND ...`; each subcommand shows only its own options."""
    parser = argparse.ArgumentParser(
        prog="jaxreshard",
        description="Split, reshard and merge checkpoints between parallel layouts (JAX meshes).",
    )
    parser.add_argument("--config", help=f"YAML job file: task ({'|'.join(COMMANDS)}) + option keys")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")
    sub = parser.add_subparsers(dest="task")
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        given = command.positional
        if given is not None:
            if given.required:
                p.add_argument(POSITIONAL, metavar=given.metavar, help=given.help)
            else:
                p.add_argument(POSITIONAL, metavar=given.metavar, nargs="?", default=argparse.SUPPRESS,
                               help=f"{given.help} (the same as {flag_name(given.field)})")
        add_arguments(p, command.options, skip=(given.field,) if given is not None and given.required else ())
    return parser


def options_from_args(task: str, args: Mapping[str, Any]) -> Any:
    """A command's options from its parsed command line (the parser's namespace as a dict)."""
    command = COMMANDS[task]
    values = dict(args)
    if POSITIONAL in values:
        given = command.positional
        assert given is not None  # only such commands have the argument
        if given.field in values:  # `verify B --dst C`
            raise ConfigError(f"{task}: give {given.help} as a positional argument or as "
                              f"{flag_name(given.field)}, not both")
        values[given.field] = values.pop(POSITIONAL)
    return build_options(command.options, values)


def options_from(task: str, values: Mapping[Any, Any], source: str) -> Any:
    """A command's options from a job file's values (`source` names the file in messages). A key of another
    command is refused naming the commands that take it; unknown keys list the valid ones for this task."""
    options = COMMANDS[task].options
    valid = set(job_keys(options))
    unknown = sorted(str(k) for k in values if k not in valid)
    if unknown:
        elsewhere = [f"{k} is an option of {', '.join(_commands_taking(k))}" for k in unknown if _commands_taking(k)]
        note = f" ({'; '.join(elsewhere)}, not of {task})" if elsewhere else ""
        raise ConfigError(f"{source}: unknown keys {unknown} for task {task}{note}; valid keys are task, "
                          f"{', '.join(job_keys(options))}")
    return build_options(options, values, source)


def _commands_taking(key: str) -> list[str]:
    return [name for name, c in COMMANDS.items() if key in job_keys(c.options)]


def read_job(path: str | Path) -> tuple[str, Any]:
    """A YAML job file: `task:` (a command; convert if absent) plus that command's option keys (a regular UTF-8
    file, size-, depth- and alias-capped: see `yamlfile`)."""
    data = load_yaml(path, ConfigError, "job config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job config must be a mapping of option names to values")
    data = dict(data)
    task = data.pop("task", DEFAULT_TASK)
    if not isinstance(task, str) or task not in COMMANDS:
        raise ConfigError(f"{path}: task {task!r:.80} is unknown; use one of {', '.join(COMMANDS)}")
    return task, options_from(task, data, str(path))


def run(task: str, options: Any) -> int:
    """Run one command with its options; returns the exit code."""
    return COMMANDS[task].run(options)
