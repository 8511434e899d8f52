"""Reading the small YAML files a user writes (job files, layout files) safely, whatever they contain.

Only regular files are read (a FIFO or device would block or never end), at most `MAX_YAML_BYTES`, as strict
UTF-8. Parsing is PyYAML's safe loader with two guards added at compose time, before any Python object exists:
nesting deeper than `MAX_YAML_DEPTH` is refused (the composer and constructor recurse), and so is a document
whose *expanded* size, each alias counted as the whole node it stands for, exceeds `MAX_YAML_NODES` (a
"billion laughs" alias bomb is a few hundred bytes that expand to 10^9 nodes in any consumer that walks or
prints it). Every failure becomes one line naming the file, and the line and column for parser errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.reader import ReaderError

from .caps import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES
from .errors import JaxreshardError
from .readfile import one_line, read_regular_file


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader refusing deep nesting and documents whose alias expansion exceeds `MAX_YAML_NODES`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._count = 0  # nodes composed so far, so a huge flat document stops early
        self._weight: dict[int, int] = {}  # id(node) -> nodes it expands to (aliases included)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._weight:  # an alias to an ancestor still being composed
                raise ComposerError(None, None, "recursive alias: a node contains itself", mark)
            return node
        mark = self.peek_event().start_mark
        self._depth += 1
        self._count += 1
        if self._count > MAX_YAML_NODES:
            raise ComposerError(None, None, f"has over {MAX_YAML_NODES} nodes", mark)
        if self._depth > MAX_YAML_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        weight = 1
        if isinstance(node, yaml.SequenceNode):
            weight += sum(self._weight[id(child)] for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            weight += sum(self._weight[id(k)] + self._weight[id(v)] for k, v in node.value)
            _refuse_duplicate_keys(node)
        if weight > MAX_YAML_NODES:
            raise ComposerError(
                None, None, f"expands (aliases counted in full) to over {MAX_YAML_NODES} nodes", mark
            )
        self._weight[id(node)] = weight
        return node


def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
    """Two `dst:` keys in one mapping would silently keep the last; refuse them instead."""
    seen: set[tuple[str, str]] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if (key.tag, key.value) in seen:
                raise ComposerError(None, None, f"duplicate key {key.value!r:.80}", key.start_mark)
            seen.add((key.tag, key.value))


def _describe(e: yaml.YAMLError) -> str:
    """'line L, column C: context (started at line l, column c); problem' from PyYAML's multi-line message."""
    if not isinstance(e, yaml.MarkedYAMLError):  # a ReaderError: its text names "<unicode string>"
        if isinstance(e, ReaderError):
            return one_line(f"{e.reason} #x{e.character:04x} at character {e.position}")
        return one_line(str(e))
    mark, start = e.problem_mark or e.context_mark, e.context_mark
    context = one_line(e.context or "")
    if context and start is not None and mark is not None and (start.line, start.column) != (mark.line, mark.column):
        context += f" (started at line {start.line + 1}, column {start.column + 1})"
    what = "; ".join(t for t in (context, one_line(e.problem or "")) if t)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def load_yaml(path: str | Path, error: type[JaxreshardError], what: str) -> Any:
    """The parsed content of a small YAML file, or `error` with one line naming the file (and line, column)."""
    path = Path(path)
    data = read_regular_file(path, MAX_YAML_BYTES, error, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                    "save it as UTF-8") from None
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader already refuses control characters here
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise error(f"{path}: {what} is not valid YAML: {_describe(e)}") from None
    except (ValueError, OverflowError) as e:  # a constructor's own refusal (an int of 5000 digits)
        raise error(f"{path}: {what} holds a value YAML cannot represent: {one_line(str(e))[:200]}") from None
    except RecursionError:  # a guard above failed to hold: still one line, never a traceback
        raise error(f"{path}: {what} is nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
