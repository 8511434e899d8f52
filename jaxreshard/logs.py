"""Console logging for jaxreshard's commands (the CLI and the MindFormers drop-ins): one format, one switch."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the logger's name says which module is speaking


def configure_logging(*, quiet: bool = False) -> None:
    """Warnings from everything; jaxreshard's own progress (INFO) too unless `quiet`. Library code never calls
    this: only a command configures the process's logging."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("jaxreshard").setLevel(logging.WARNING if quiet else logging.INFO)
