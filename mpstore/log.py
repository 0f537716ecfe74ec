"""Logging set-up: one line per event on stderr, in agent-lightning's format (SPEC §6)."""

from __future__ import annotations

import logging

__all__ = ["LOG_FORMAT", "configure_logging"]

LOG_FORMAT = "%(asctime)s [%(levelname)s] (Process-%(process)d %(name)s)   %(message)s"


def configure_logging(level: int | str = "INFO", name: str = "mpstore") -> logging.Logger:
    """Send the ``name`` logger (and its children) to stderr at ``level``; idempotent."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False
    return logger
