"""Opening and parsing source files that may be wrong or hostile: regular files only, bounded JSON, sane names.

Why a module of its own: every reader (safetensors headers, Hugging Face indexes, `.ckpt` records, source
discovery) needs the same guards, and each guard closes a way a bad input used to hang or crash the tool:
- a FIFO given as a checkpoint blocked `open` forever, and `/dev/null` or a socket reached the parsers, so files
  are opened with `O_NONBLOCK` and refused by `fstat` unless they are regular files;
- `json.loads` raises `RecursionError` on deep nesting and `ValueError` on 4300-digit numbers, and decodes lone
  surrogates that cannot be written back, so JSON is parsed through one function that turns all of it into a
  one-line `FormatError`;
- a parameter name that is empty or holds a NUL cannot be told apart from another one in messages, layouts and
  output files, so names are checked once where they are read.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import FormatError
from ..readfile import one_line

MAX_DIMS = 64  # numpy's own limit (NPY_MAXDIMS): a tensor with more dimensions cannot exist in memory


class NotACheckpoint(FormatError):
    """The path is in no checkpoint format at all (it may be something else, e.g. a strategy file); raised
    instead of a plain FormatError so `inspect` can try other readers without hiding a real problem such as
    a truncated checkpoint."""


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for messages."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, what: str) -> BinaryIO:
    """Open `path` for reading, refusing at once anything but a regular file (O_NONBLOCK: a FIFO never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise FormatError(f"{path}: cannot open {what}: {e.strerror}; check that it exists and is readable") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FormatError(f"{path}: {what} is {file_kind(mode)}; only regular files are read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def stat_source(path: Path, what: str = "source checkpoint") -> os.stat_result:
    """`os.stat` (following links) with a one-line FormatError naming the path on failure."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: {what} does not exist") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot access {what}: {e.strerror}") from None


def list_dir(path: Path) -> list[Path]:
    """The entries of a source folder, sorted by name (never directory order), with a one-line error."""
    try:
        return sorted(Path(path).iterdir())
    except OSError as e:
        raise FormatError(f"{path}: cannot list the source folder: {e.strerror}") from None


def _json_int(text: str) -> int | float:
    """JSON `-0` is a float to serde (so the safetensors library refuses it as a size) but an int to Python."""
    return -0.0 if text == "-0" else int(text)


MAX_JSON_CONTAINERS = 16_000_000  # objects + arrays of one JSON text (real headers and manifests: a few million)


def check_json_width(raw: bytes, where: object, what: str) -> None:
    """Refuse JSON with more objects and arrays than any real header, index or manifest holds, before parsing:
    `[{},{},...]` costs Python ~20 times its size (a 60 MB header took 1.6 GB), the byte caps alone allow GBs.
    Brackets inside strings are counted too, which only makes the bound safer."""
    count = raw.count(b"{") + raw.count(b"[")
    if count > MAX_JSON_CONTAINERS:
        raise FormatError(f"{where}: corrupt {what}: {count} JSON objects and arrays, over the cap of "
                          f"{MAX_JSON_CONTAINERS}; no real one holds that many")


def load_json(raw: bytes, where: object, what: str, hook: Callable[[list], Any] | None = None) -> Any:
    """Parse untrusted JSON: strict UTF-8, every parser failure (nesting, huge numbers, syntax) one line, and
    at most `MAX_JSON_CONTAINERS` objects and arrays (bounded memory)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: corrupt {what}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    check_json_width(raw, where, what)
    try:
        return json.loads(text, object_pairs_hook=hook, parse_int=_json_int)
    except RecursionError:
        raise FormatError(f"{where}: corrupt {what}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and the 4300-digit integer limit
        raise FormatError(f"{where}: corrupt {what}: not valid JSON ({one_line(e)})") from None


def check_text(text: str, where: str, what: str) -> None:
    """Refuse strings JSON can hold but no file can store (lone surrogates: `"\\ud800"`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{where}: {what} {text!r} is not valid Unicode (a lone surrogate); "
                          "the file is corrupt") from None


def check_name(name: str, where: object) -> None:
    """A parameter name must be non-empty, NUL-free Unicode: anything else cannot be named or stored again."""
    if not name:
        raise FormatError(f"{where}: a tensor has an empty name; every parameter needs a name")
    if "\0" in name:
        raise FormatError(f"{where}: parameter {name!r} has a NUL character in its name; the file is corrupt")
    check_text(name, str(where), "parameter name")


