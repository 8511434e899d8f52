"""Logging for the command-line entry points (`jaxreshard`, the tools/ drop-ins): one format, set up once."""

from __future__ import annotations

import logging

LOG = logging.getLogger("jaxreshard")


def setup_logging(quiet: bool = False) -> None:
    """Warnings from everything; jaxreshard's own progress lines (INFO) unless `quiet`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    LOG.setLevel(logging.WARNING if quiet else logging.INFO)
