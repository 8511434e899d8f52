"""Errors a user can act on.

Every `JaxreshardError` becomes exit code 2 and one line on stderr in the CLI; anything else is a bug
(exit 1 with a traceback). Messages name the file, parameter and rank involved, what was expected, what
was found, and what to do.
"""

from __future__ import annotations


class JaxreshardError(Exception):
    """Bad input or usage: the user can fix it."""


class ConfigError(JaxreshardError):
    """A config file, CLI flag or library argument is wrong."""


class FormatError(JaxreshardError):
    """A checkpoint or strategy file is unreadable, truncated, corrupt or inconsistent."""


class LayoutError(JaxreshardError):
    """A layout cannot describe a parameter (unknown axis, indivisible dimension, ...)."""


class PlanError(JaxreshardError):
    """The conversion cannot be planned (a missing parameter or rank, a gap or an overlap)."""


class OutputExistsError(JaxreshardError):
    """The destination exists and `overwrite` was not given."""


class OutputError(JaxreshardError):
    """The destination cannot be written: another run holds it, it is not writable, the disk is full, or it
    changed underneath the run."""
