"""Typed command options: each command's options are one frozen dataclass whose fields are at once its CLI flags
(`src_layout` is `--src-layout`) and its job-file keys (`src_layout:`), with the help text in the field.

Values are parsed and validated once, when the options are built (`build_options`), from the command line's
strings or a job file's YAML values alike: ints are ints within their caps, sizes are bytes, flags are bools.
A bad value is one `ConfigError` line naming the flag (`--workers must be an integer in 1..1024, got 0`) or the
job file and key (`job.yaml: workers must be ...`). A field without a default is required.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..caps import MAX_PROCESSES, MAX_RANKS
from ..errors import ConfigError
from ..run import parse_ranks
from ..values import parse_bool, parse_size

T = TypeVar("T")
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take '٣' or '1_0'


def parse_text(value: str, name: str) -> str:
    """A path or a word, kept as written."""
    return value


@dataclass(frozen=True)
class Integer:
    """An integer within [minimum, maximum], so a zero, negative or absurd count is refused before anything runs."""

    minimum: int
    maximum: int

    def __call__(self, value: str, name: str) -> int:
        text = value.strip()
        if not _INTEGER.fullmatch(text):
            raise ConfigError(f"{name} must be an integer, got {value[:40]!r}")
        number = int(text) if len(text) <= 12 else self.maximum + 1  # no huge int() of a hostile digit string
        if not self.minimum <= number <= self.maximum:
            raise ConfigError(f"{name} must be an integer in {self.minimum}..{self.maximum}, got {text[:40]}")
        return number


WORKER_COUNT = Integer(1, MAX_PROCESSES)  # local worker processes
PROCESS_COUNT = Integer(1, MAX_RANKS)  # processes of a jax.distributed job: at most one per destination rank
PROCESS_INDEX = Integer(0, MAX_RANKS - 1)


def parse_number(value: str, name: str) -> float:
    """A finite number (nan and inf would silently fill the output with nan/inf)."""
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value[:40]!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value[:40]!r}")
    return number


def parse_bytes(value: str, name: str) -> int:
    """A size (5GB, 500MiB, 1000) in bytes, at least one (a size of 0 would plan, then fail late)."""
    size = parse_size(value)
    if size is None or size < 1:
        raise ConfigError(f"{name} must be at least 1 byte, got {value!r:.40}")
    return size


def parse_truth(value: str, name: str) -> bool:
    """true/false (also yes/no, 1/0) given as a value, for options that are not plain on/off flags."""
    try:
        return parse_bool(value)
    except ValueError:
        raise ConfigError(f"{name} must be true or false, got {value!r}") from None


def parse_rank_list(value: str, name: str) -> tuple[int, ...] | None:
    """'0-3,8' -> (0, 1, 2, 3, 8); empty = every rank (messages from `parse_ranks`, capped before expanding)."""
    ranks = parse_ranks(value)
    return None if ranks is None else tuple(ranks)


@dataclass(frozen=True)
class Option:
    """What a field needs to become a flag and a job key; kept in the field's metadata."""

    help: str
    parse: Callable[[str, str], Any] | None = parse_text  # one value; None = an on/off flag (a bool)
    many: bool = False  # a list of values (`nargs="+"`), a tuple of parsed values
    short: str | None = None  # e.g. "-q"
    aliases: tuple[str, ...] = ()  # older spellings accepted as flags and keys (`process_num` for `workers`)
    metavar: str | None = None


def option(help: str, parse: Callable[[str, str], Any] | None = parse_text, default: Any = dataclasses.MISSING,
           **extra: Any) -> Any:
    """A dataclass field that is an option (no `default` = required)."""
    return field(default=default, metadata={"option": Option(help, parse, **extra)})


def flag(help: str, **extra: Any) -> Any:
    """An on/off option, off by default."""
    return option(help, None, False, **extra)


def option_fields(options: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(options) if "option" in f.metadata}


def spec(f: dataclasses.Field) -> Option:
    return f.metadata["option"]


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def job_keys(options: type) -> list[str]:
    """Every key a job file may give for these options: field names, then their older spellings."""
    fields = option_fields(options)
    return [*fields, *(alias for f in fields.values() for alias in spec(f).aliases)]


def add_arguments(parser: argparse.ArgumentParser, options: type, *, skip: tuple[str, ...] = ()) -> None:
    """A `--flag` per field of `options` (and one per older spelling); defaults are suppressed so that only what
    was given reaches `build_options`, which applies the dataclass defaults."""
    for name, f in option_fields(options).items():
        if name in skip:
            continue
        opt = spec(f)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS}
        if opt.parse is None:
            kwargs["action"] = "store_true"
        elif opt.many:
            kwargs["nargs"] = "+"
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        flags = [opt.short, flag_name(name)] if opt.short else [flag_name(name)]
        parser.add_argument(*flags, dest=name, help=opt.help, **kwargs)
        for alias in opt.aliases:
            parser.add_argument(flag_name(alias), dest=alias, help=f"the same as {flag_name(name)}", **kwargs)


def build_options(options: type[T], values: Mapping[Any, Any], source: str | None = None) -> T:
    """`options` from given values: command-line strings (`source` None) or a job file's YAML values (`source`
    its path). Unknown keys, a key given twice under two spellings, missing required options and bad values
    are each refused with one line."""
    fields = option_fields(options)
    aliases: dict[str, str] = {alias: name for name, f in fields.items() for alias in spec(f).aliases}
    unknown = sorted(str(k) for k in values if k not in fields and k not in aliases)
    if unknown:
        raise ConfigError(f"{source or 'command line'}: unknown keys {unknown}; "
                          f"valid keys are task, {', '.join(job_keys(options))}")
    given: dict[str, tuple[str, Any]] = {}  # field -> (the spelling used, the value)
    for key, value in values.items():
        name = aliases[key] if key in aliases else key
        if name in given:
            first, second = (given[name][0], key) if source else (flag_name(given[name][0]), flag_name(key))
            raise ConfigError(f"{source + ': ' if source else ''}give {first} or {second}, not both")
        given[name] = (key, value)
    missing = [n for n, f in fields.items() if _required(f) and given.get(n, (n, None))[1] is None]
    if missing:
        if source:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        raise ConfigError(f"missing required option(s) {', '.join(map(flag_name, missing))}")
    typed = {}
    for name, (key, value) in given.items():
        label = f"{source}: {key}" if source else flag_name(key)
        if value is not None or spec(fields[name]).parse is None:  # None in YAML: not given
            typed[name] = _typed(spec(fields[name]), value, label)
    return options(**typed)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _typed(opt: Option, value: Any, label: str) -> Any:
    """One option's value, parsed; a list where one value is wanted (or a mapping) is refused."""
    if opt.parse is None:
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {value!r:.80}")
        return value
    if opt.many:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{label} must be a list of values, got {value!r:.80}")
        return tuple(opt.parse(_scalar(v, label), label) for v in items)
    return opt.parse(_scalar(value, label), label)


def _scalar(value: Any, label: str) -> str:
    """A single YAML value as the text a command line would give (`has_redundancy: true` is 'True')."""
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(f"{label} must be a single value, got a {type(value).__name__} {value!r:.80}")


@dataclass(frozen=True)
class Positional:
    """An option that may also be given as the command's positional argument (`inspect SRC`, `verify B`)."""

    field: str
    metavar: str
    help: str
    required: bool = False  # True: only positional (no flag); False: positional or flag, not both


@dataclass(frozen=True)
class Command:
    """One subcommand: its options (a frozen dataclass of `option` fields), its handler (options -> exit code),
    its one-line help, and perhaps a positional argument."""

    name: str
    options: type
    run: Callable[[Any], int]
    help: str
    positional: Positional | None = None
