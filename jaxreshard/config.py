"""Job files, kept importable here for existing callers: the command table (`jaxreshard.commands`) now holds each
command's typed options, its flags and its job keys."""

from __future__ import annotations

from .commands import COMMANDS, options_from, read_job

TASKS = tuple(COMMANDS)

__all__ = ["TASKS", "options_from", "read_job"]
