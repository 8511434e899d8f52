"""logs.py: one console logging setup for the CLI and the drop-ins."""

from __future__ import annotations

import logging

from jaxreshard.logs import LOG_FORMAT, configure_logging


def test_quiet_keeps_warnings_only():
    logger = logging.getLogger("jaxreshard")
    before = logger.level
    try:
        configure_logging(quiet=True)
        assert logger.getEffectiveLevel() == logging.WARNING
        assert not logging.getLogger("jaxreshard.mindspore.planner").isEnabledFor(logging.INFO)
        configure_logging()
        assert logger.getEffectiveLevel() == logging.INFO
        assert logging.getLogger("jaxreshard.mindspore.planner").isEnabledFor(logging.INFO)
    finally:
        logger.setLevel(before)  # setLevel also clears the loggers' cached levels


def test_the_format_names_the_module():
    record = logging.LogRecord("jaxreshard.api", logging.INFO, __file__, 1, "wrote %d file(s)", (3,), None)
    assert logging.Formatter(LOG_FORMAT).format(record) == "INFO jaxreshard.api: wrote 3 file(s)"
