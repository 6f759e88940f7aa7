"""The supervisor's log: one line per event on stderr, "runner: ...", unless the caller set up logging.

`runner start` logs through the `runner` logger; a program that embeds the
supervisor and configured that logger keeps its own handlers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "runner: "
        if record.levelno >= logging.ERROR:
            prefix += "error: "
        elif record.levelno >= logging.WARNING:
            prefix += "warning: "
        return prefix + record.getMessage()


@contextmanager
def to_stderr() -> Iterator[None]:
    """One line per event on stderr, "runner: ...", unless the caller set up logging for `runner`."""
    root = logging.getLogger("runner")
    if root.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    level, propagate = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        root.propagate = propagate
